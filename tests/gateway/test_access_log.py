"""The access log, end to end: a gateway in front of simulator workers (engine `sim`),
driven with the `openai` SDK and httpx; the lines are read from the `gateway.access`
logger. A streamed, a non-streamed, a failed and an aborted request each get exactly one
line with every field; the key is logged as a hash prefix only; the client's
`x-request-id` is kept and reaches the worker; the log can be switched off and sampled."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.access_log import LOGGER, finish_reason, key_id
from tests.conftest import ServerThread, start_gateway

KEY = "sk-test-access-log-key"
FIELDS = {
    "time", "request_id", "model", "adapter", "key_id", "route", "stream", "status",
    "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms", "worker", "retries",
    "finish_reason",
}  # fmt: skip
CHAT = [{"role": "user", "content": "hello there"}]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))

    def by_id(self, rid: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["request_id"] == rid]


@pytest.fixture(scope="module")
def lines() -> Iterator[Lines]:
    handler = Lines()
    log = logging.getLogger(LOGGER)
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)


def _models() -> list[dict[str, Any]]:
    return [
        {"name": "m", "engine": "sim", "options": {"itl_ms": 1, "output_tokens": 5}},
        {"name": "failing", "engine": "sim", "options": {"error_rate": 1.0}},
        {"name": "slow", "engine": "sim", "options": {"itl_ms": 50, "output_tokens": 200}},
    ]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, lines: Lines) -> Iterator[ServerThread]:
    server = start_gateway(_models(), tmp_path_factory.mktemp("access"), api_keys=KEY)
    yield server
    server.stop()


def _wait_for(lines: Lines, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not lines.by_id(rid):
        assert time.monotonic() < deadline, f"no access-log line for {rid}"
        time.sleep(0.01)
    found = lines.by_id(rid)
    assert len(found) == 1, found
    assert set(found[0]) >= FIELDS, set(found[0]) ^ FIELDS
    return found[0]


def test_streamed_request_gets_one_full_line(gw: ServerThread, lines: Lines) -> None:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0) as client:
        stream = client.chat.completions.create(
            model="m",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
            extra_headers={"x-request-id": "client-id-1"},
        )
        chunks = list(stream)
    # The client's id reached the worker (the simulator builds the response id from it).
    assert "client-id-1" in chunks[0].id
    line = _wait_for(lines, "client-id-1")
    assert line["model"] == "m" and line["route"] == "chat" and line["stream"] is True
    assert line["status"] == 200 and line["finish_reason"] == "length"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 5
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert line["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert KEY not in json.dumps(line)
    # The sim engine runs its worker on loopback: the log names it, with no retries.
    assert line["worker"].startswith("http://127.0.0.1:") and line["retries"] == 0
    assert line["adapter"] is None
    assert line["time"].endswith("Z")


def test_non_streamed_and_failed_requests(gw: ServerThread, lines: Lines) -> None:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0) as client:
        client.completions.create(
            model="m", prompt="a b", max_tokens=3, extra_headers={"x-request-id": "ok-2"}
        )
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="failing",
                messages=CHAT,  # type: ignore[arg-type]
                extra_headers={"x-request-id": "fail-3"},
            )
    ok = _wait_for(lines, "ok-2")
    assert (ok["route"], ok["stream"], ok["status"]) == ("completions", False, 200)
    assert ok["ttft_ms"] is None
    assert ok["finish_reason"] == "length" and ok["completion_tokens"] == 3
    assert ok["worker"].startswith("http://127.0.0.1:") and ok["retries"] == 0
    failed = _wait_for(lines, "fail-3")
    assert failed["status"] >= 500 and failed["finish_reason"] is None
    assert failed["model"] == "failing" and failed["error"]
    # A wrong key is logged by its hash too; an unknown model has model null.
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT},
        headers={"authorization": "Bearer wrong", "x-request-id": "auth-4"},
    )
    assert r.status_code == 401
    bad = _wait_for(lines, "auth-4")
    assert bad["status"] == 401 and bad["model"] is None
    assert bad["key_id"] == hashlib.sha256(b"wrong").hexdigest()[:12]


async def test_aborted_stream_is_logged_as_499(gw: ServerThread, lines: Lines) -> None:
    body = {"model": "slow", "messages": CHAT, "max_tokens": 200, "stream": True}
    headers = {"authorization": f"Bearer {KEY}", "x-request-id": "abort-5"}
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        async for _ in r.aiter_bytes():
            break
    await asyncio.to_thread(_wait_for, lines, "abort-5")
    line = lines.by_id("abort-5")[0]
    assert line["status"] == 499 and line["stream"] is True and line["ttft_ms"] is not None


def test_request_id_is_bounded_and_printable(gw: ServerThread, lines: Lines) -> None:
    for bad in ("x" * 129, "tab\there", "é-accent"):
        r = httpx.post(
            f"{gw.url}/v1/completions",
            json={"model": "m", "prompt": "a", "max_tokens": 1},
            headers=[(b"authorization", f"Bearer {KEY}".encode()), (b"x-request-id", bad.encode())],
        )
        assert r.status_code == 200
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) <= 128
        _wait_for(lines, r.headers["x-request-id"])


def test_switch_off_and_sampling(tmp_path: Path, lines: Lines) -> None:
    models = [_models()[0]]
    for settings, expect in (({"access_log": False}, 0), ({"access_log_sample": 0.0}, 0)):
        server = start_gateway(models, tmp_path, **settings)
        try:
            before = len(lines.lines)
            for i in range(5):
                httpx.post(
                    f"{server.url}/v1/completions",
                    json={"model": "m", "prompt": "a", "max_tokens": 1},
                    headers={"x-request-id": f"sampled-{i}"},
                ).raise_for_status()
            # A failure is logged even at sample 0 (never when switched off).
            httpx.post(
                f"{server.url}/v1/completions",
                json={"model": "nope", "prompt": "a"},
                headers={"x-request-id": "sampled-fail"},
            )
            time.sleep(0.2)
            new = lines.lines[before:]
            assert sum(1 for x in new if x["status"] == 200) == expect
            failures = [x for x in new if x["request_id"] == "sampled-fail"]
            assert len(failures) == (0 if settings.get("access_log") is False else 1)
        finally:
            server.stop()


def test_finish_reason_and_key_id_helpers() -> None:
    tail = (
        b'data: {"choices":[{"finish_reason":null}]}\n\n'
        b'data: {"choices":[{"finish_reason": "stop"}]}\n\n'
    )
    assert finish_reason(tail) == "stop"
    assert finish_reason(b'{"finish_reason":null}', b'{"finish_reason":"length"}') == "length"
    assert finish_reason(b"", None) is None
    assert key_id(b"Bearer abc") == hashlib.sha256(b"abc").hexdigest()[:12]
    assert key_id(b"Basic abc") is None and key_id(None) is None


def test_serve_writes_the_lines_to_stdout(tmp_path: Path) -> None:
    """The default sink (no logging handlers in a fresh `gateway serve`): batched lines
    on stdout, all written by the time the server has stopped."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {name: m, engine: sim, options: {output_tokens: 3}}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_PORT=str(port), GATEWAY_CONFIG=str(config), GATEWAY_LOG_LEVEL="warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway serve did not start"
            time.sleep(0.1)
        for i in range(3):
            httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"model": "m", "prompt": "a", "stream": i == 1},
                headers={"x-request-id": f"stdout-{i}"},
            ).raise_for_status()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    assert [x["request_id"] for x in lines] == ["stdout-0", "stdout-1", "stdout-2"]
    assert [x["stream"] for x in lines] == [False, True, False]
    assert all(set(x) >= FIELDS and x["status"] == 200 for x in lines)
