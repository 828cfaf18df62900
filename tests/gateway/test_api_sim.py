"""The gateway in front of simulator workers (attach mode, `openai` engine), driven with the
official `openai` SDK and httpx: relay fidelity, errors before and after the first byte,
disconnect cancelling the upstream, LoRA hot-swap reaching every worker, adapter path
policy, metrics and Server-Timing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from simulator import SimServer
from tests.conftest import ADMIN_KEY, ServerThread, start_gateway


class SimThread:
    """Simulator servers on their own event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=30)

    def start(self, **config: Any) -> SimServer:
        server = SimServer(**config)
        self.call(server.start("127.0.0.1", 0))
        return server

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def fleet(sims: SimThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two healthy workers behind model "m", plus one-worker models with faults."""
    root = tmp_path_factory.mktemp("lora-root")
    workers = [sims.start(model="m", itl_ms=1) for _ in range(2)]
    slow = sims.start(model="slow", ttft_ms=5, itl_ms=50, output_tokens=200)
    failing = sims.start(model="failing", error_rate=1.0, error_status=500)
    busy = sims.start(model="busy", error_rate=1.0, error_status=429)
    dropping = sims.start(model="dropping", drop_after=3, itl_ms=1)
    models = [
        {
            "name": "m",
            "engine": "openai",
            "endpoints": [w.url for w in workers],
            "lora": {"max_adapters": 4, "roots": [str(root)]},
        },
        {"name": "slow", "engine": "openai", "endpoints": [slow.url]},
        {"name": "failing", "engine": "openai", "endpoints": [failing.url]},
        {"name": "busy", "engine": "openai", "endpoints": [busy.url]},
        {"name": "dropping", "engine": "openai", "endpoints": [dropping.url]},
        {
            "name": "renamed",
            "engine": "openai",
            "endpoints": [workers[0].url],
            "served_model_name": "m",
        },
    ]
    gw = start_gateway(models, root.parent)
    yield {"gw": gw, "workers": workers, "slow": slow, "root": root}
    gw.stop()
    for s in (*workers, slow, failing, busy, dropping):
        sims.call(s.stop())


@pytest.fixture
def client(fleet: dict[str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{fleet['gw'].url}/v1", api_key="x", max_retries=0) as client:
        yield client


CHAT = [{"role": "user", "content": "hello there"}]


def test_attach_mode_serves_through_both_workers(
    client: openai.OpenAI, fleet: dict[str, Any]
) -> None:
    before = [w.requests_total for w in fleet["workers"]]
    for _ in range(6):
        resp = client.chat.completions.create(model="m", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        assert resp.choices[0].message.content
        assert resp.usage is not None and resp.usage.completion_tokens == 3
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="m", prompt="a b c", max_tokens=4, stream=True)
    )
    assert len(text.split()) == 4
    after = [w.requests_total for w in fleet["workers"]]
    assert all(a > b for a, b in zip(after, before, strict=True))


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def test_stream_is_relayed_byte_for_byte(fleet: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "messages": CHAT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    worker = fleet["workers"][0]
    direct = httpx.post(
        f"{worker.url}/v1/chat/completions", json=body, headers={"x-request-id": "same"}
    ).content
    via = httpx.post(
        f"{fleet['gw'].url}/v1/chat/completions", json=body, headers={"x-request-id": "same"}
    ).content

    def norm(e: bytes) -> Any:  # `created` is the only field allowed to differ
        if e == b"data: [DONE]":
            return e
        obj = json.loads(e[6:])
        obj.pop("created", None)
        return obj

    assert [norm(e) for e in _events(via)] == [norm(e) for e in _events(direct)]
    assert _events(via)[-1] == b"data: [DONE]"


def test_model_rename_rewrites_model_field(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="renamed", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert resp.model == "renamed"
    chunks = list(
        client.chat.completions.create(
            model="renamed",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=2,
            stream=True,
        )
    )
    assert {c.model for c in chunks} == {"renamed"}


def test_upstream_500_is_a_5xx_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="failing", messages=CHAT)  # type: ignore[arg-type]
    assert info.value.status_code >= 500
    assert set(info.value.response.json()["error"]) == {"message", "type", "param", "code"}


def test_stream_failing_before_first_byte_is_a_status_not_a_stream(
    fleet: dict[str, Any],
) -> None:
    resp = httpx.post(
        f"{fleet['gw'].url}/v1/chat/completions",
        json={"model": "failing", "messages": CHAT, "stream": True},
    )
    assert resp.status_code >= 500
    assert resp.headers["content-type"] == "application/json"
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    metrics = httpx.get(f"{fleet['gw'].url}/metrics").text
    assert 'gateway_requests_in_flight{model="failing",route="chat"} 0.0' in metrics


def test_upstream_429_keeps_retry_after(fleet: dict[str, Any]) -> None:
    resp = httpx.post(
        f"{fleet['gw'].url}/v1/chat/completions", json={"model": "busy", "messages": CHAT}
    )
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["type"]


def test_failure_after_first_byte_ends_with_error_event_and_no_done(
    fleet: dict[str, Any], client: openai.OpenAI
) -> None:
    raw = httpx.post(
        f"{fleet['gw'].url}/v1/chat/completions",
        json={"model": "dropping", "messages": CHAT, "max_tokens": 20, "stream": True},
    ).content
    events = _events(raw)
    assert events[0].startswith(b"data: {")
    assert b"[DONE]" not in raw
    last = json.loads(events[-1][6:])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIError):  # the SDK raises on an error event
        list(
            client.chat.completions.create(
                model="dropping",
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=20,
                stream=True,
            )
        )


async def test_client_disconnect_cancels_the_upstream_at_once(fleet: dict[str, Any]) -> None:
    slow: SimServer = fleet["slow"]
    body = {"model": "slow", "messages": CHAT, "max_tokens": 200, "stream": True}
    async with (
        httpx.AsyncClient(base_url=fleet["gw"].url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        async for _ in r.aiter_bytes():
            break
        assert slow.running == 1
    left = time.monotonic()
    while slow.running:
        assert time.monotonic() - left < 1.0, "the upstream request was not closed"
        await asyncio.sleep(0.01)

    # Non-streamed: the client gives up; the upstream request is closed too.
    async with httpx.AsyncClient(base_url=fleet["gw"].url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/v1/chat/completions", json={"model": "slow", "messages": CHAT, "max_tokens": 200}
            )
    left = time.monotonic()
    while slow.running:
        assert time.monotonic() - left < 1.0, "the upstream request was not closed"
        await asyncio.sleep(0.01)


def _make_adapter(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return d


def _admin(
    gw: ServerThread, path: str, body: dict[str, Any], key: str | None = ADMIN_KEY
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gw.url}{path}", json=body, headers=headers)


def test_lora_load_use_unload_reaches_every_worker(
    client: openai.OpenAI, fleet: dict[str, Any]
) -> None:
    gw, root = fleet["gw"], fleet["root"]
    path = _make_adapter(root, "sql")
    resp = _admin(gw, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(path)})
    assert resp.status_code == 200, resp.text
    assert all("sql" in w.adapters for w in fleet["workers"])
    listed = {m.id: m for m in client.models.list()}
    assert listed["sql"].model_extra is not None and listed["sql"].model_extra["parent"] == "m"
    out = client.chat.completions.create(model="sql", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert out.model == "sql"
    # the same name twice is refused
    assert (
        _admin(
            gw, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(path)}
        ).status_code
        == 400
    )
    resp = _admin(gw, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert resp.status_code == 200, resp.text
    assert not any("sql" in w.adapters for w in fleet["workers"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="sql", messages=CHAT)  # type: ignore[arg-type]
    assert _admin(gw, "/v1/unload_lora_adapter", {"lora_name": "sql"}).status_code == 404


def test_adapter_paths_outside_the_roots_are_refused(fleet: dict[str, Any], tmp_path: Path) -> None:
    gw, root = fleet["gw"], fleet["root"]
    outside = _make_adapter(tmp_path, "evil")
    link = root / "link"
    if not link.exists():
        link.symlink_to(outside)
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "adapter_config.json").write_text("{}")
    for bad in (
        str(outside),
        f"{root}/../{outside.parent.name}/evil",
        str(link),
        str(empty),
        "relative/path",
        str(root / "missing"),
    ):
        resp = _admin(gw, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": bad})
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["error"]["param"] == "lora_path"
    assert not any("x" in w.adapters for w in fleet["workers"])


def test_admin_routes_need_the_admin_key(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    assert _admin(gw, "/v1/load_lora_adapter", {}, key=None).status_code == 401
    assert _admin(gw, "/v1/load_lora_adapter", {}, key="wrong").status_code == 401


def test_metrics_health_and_server_timing(client: openai.OpenAI, fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    raw = client.chat.completions.with_raw_response.create(
        model="m",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=2,
    )
    timing = raw.headers["server-timing"]
    assert timing.startswith("gateway;dur=") and "upstream;dur=" in timing
    list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=3, stream=True))  # type: ignore[arg-type]
    text = httpx.get(f"{gw.url}/metrics").text
    for needle in (
        'gateway_requests_total{model="m",route="chat",status_class="2xx"}',
        'gateway_time_to_first_token_seconds_count{model="m"}',
        'gateway_inter_token_latency_seconds_count{model="m"}',
        'gateway_prompt_tokens_total{model="m"}',
        'gateway_completion_tokens_total{model="m"}',
        'gateway_requests_in_flight{model="m",route="chat"} 0.0',
        'gateway_worker_healthy{model="m",worker="',
    ):
        assert needle in text, needle
    health = httpx.get(f"{gw.url}/health")
    assert health.status_code == 200 and health.json()["models"]["m"]["ready"]
