"""OpenAIEngine (and SimEngine) against real simulator servers on loopback, plus a small
aiohttp upstream fixture that answers with the odd error shapes real upstreams send."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from engines import engine_class
from engines.base import (
    AdapterError,
    AdapterNotFound,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    GenerateRequest,
    InvalidRequest,
    ServingError,
    UpstreamError,
)
from engines.sim import SimEngine
from engines.spec import ModelSpec
from engines.upstream.engine import OpenAIEngine
from engines.upstream.errors import UpstreamModelNotFound
from engines.upstream.sse import SSEBuffer
from simulator import SimConfig, SimServer

MODEL = "sim-m"
FAST = {"health_interval_s": 0.1, "start_timeout_s": 3.0}


def spec(endpoints: list[str], **kw: Any) -> ModelSpec:
    options = {**FAST, **kw.pop("options", {})}
    return ModelSpec(name=kw.pop("name", MODEL), engine="openai", endpoints=endpoints,
                     options=options, **kw)  # fmt: skip


def chat(
    stream: bool = False, max_tokens: int = 4, adapter: str | None = None, **extra: Any
) -> GenerateRequest:
    body: dict[str, Any] = {
        "model": adapter or MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        **extra,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return GenerateRequest("chat", body, adapter or MODEL, adapter, "req-1", int(time.time()))


async def sims(n: int, **kw: Any) -> list[SimServer]:
    out = []
    for _ in range(n):
        s = SimServer(SimConfig(model=MODEL, seed=0), **kw)
        await s.start()
        out.append(s)
    return out


async def started(sp: ModelSpec, cls: type[OpenAIEngine] = OpenAIEngine) -> OpenAIEngine:
    engine = cls(sp)
    await engine.start()
    return engine


async def collect(engine: OpenAIEngine, req: GenerateRequest) -> bytes:
    return b"".join([b async for b in engine.stream(req)])


async def eventually(cond: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _norm(b: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', b)


@pytest.fixture
async def two() -> AsyncIterator[tuple[OpenAIEngine, list[SimServer]]]:
    servers = await sims(2, output_tokens=6)
    engine = await started(spec([s.url for s in servers]))
    yield engine, servers
    await engine.stop()
    for s in servers:
        await s.stop()


def test_sse_buffer_framing() -> None:
    buf = SSEBuffer()
    assert buf.feed(b'data: {"a":1}\r') == b""
    assert buf.feed(b'\n\r\ndata: {"b"') == b'data: {"a":1}\n\n'
    assert buf.feed(b":2}\n") == b""
    assert buf.feed(b"\ndata: x\n\n") == b'data: {"b":2}\n\ndata: x\n\n'
    assert buf.pending == b""


async def test_byte_exact_relay(two: tuple[OpenAIEngine, list[SimServer]]) -> None:
    engine, servers = two
    req = chat(stream=True, n=2)
    relayed = await collect(engine, req)
    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"{servers[0].url}/v1/chat/completions",
            content=orjson.dumps(req.body),
            headers={"X-Request-Id": req.request_id},
        )
    direct = r.content
    assert direct.endswith(b"data: [DONE]\n\n")
    assert _norm(relayed) == _norm(direct[: -len(b"data: [DONE]\n\n")])
    assert b"[DONE]" not in relayed


async def test_complete_relays_body_and_usage(two: tuple[OpenAIEngine, list[SimServer]]) -> None:
    engine, servers = two
    done = await engine.complete(chat(max_tokens=3))
    obj = orjson.loads(done.body)
    assert obj["model"] == MODEL and obj["id"] == "chatcmpl-req-1"
    assert obj["choices"][0]["message"]["content"] == " the quick brown"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 3)
    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"{servers[1].url}/v1/chat/completions",
            content=orjson.dumps(chat(max_tokens=3).body),
            headers={"X-Request-Id": "req-1"},
        )
    assert _norm(done.body) == _norm(r.content)


async def test_model_rename_and_transform_hook() -> None:
    (server,) = await sims(1)

    class Stripping(OpenAIEngine):
        def transform_chunk(self, obj: dict[str, Any]) -> dict[str, Any] | None:
            obj.pop("system_fingerprint", None)
            return obj

    engine = await started(spec([server.url], name="alias", served_model_name=MODEL))
    hooked = await started(spec([server.url]), Stripping)
    try:
        req = chat(stream=True)
        req.model = "alias"
        done = await engine.complete(chat())
        assert orjson.loads(done.body)["model"] == "alias"
        events = [e for e in (await collect(engine, chat(stream=True))).split(b"\n\n") if e]
        assert events and all(orjson.loads(e[6:])["model"] == "alias" for e in events)
        body = await collect(hooked, chat(stream=True))
        assert b"system_fingerprint" not in body and b'"content":" the"' in body
        # The fast path is untouched by a hook on the other method.
        assert b"system_fingerprint" in (await hooked.complete(chat())).body
    finally:
        await engine.stop()
        await hooked.stop()
        await server.stop()


# ---------------------------------------------------------------- error normalisation

SCENARIOS: dict[str, tuple[int, bytes, dict[str, str]]] = {
    "openai400": (
        400,
        b'{"error":{"message":"bad temp","type":"invalid_request_error",'
        b'"param":"temperature","code":"bad_value"}}',
        {},
    ),
    "vllm_old404": (
        404,
        b'{"object":"error","message":"The model `x` does not exist.",'
        b'"type":"NotFoundError","param":null,"code":404}',
        {},
    ),
    "fastapi422": (
        422,
        b'{"detail":[{"loc":["body","messages"],"msg":"Field required","type":"missing"}]}',
        {},
    ),
    "message429": (429, b'{"message":"slow down"}', {"Retry-After": "7"}),
    "text500": (500, b"Internal Server Error: boom", {}),
    "detail503": (503, b'{"detail":"warming up"}', {}),
    "auth401": (401, b'{"error":"Unauthorized"}', {}),
    "text504": (504, b"upstream timed out", {}),
}


@pytest.fixture
async def odd_upstream() -> AsyncIterator[str]:
    """An upstream answering by the request's `user` field: an error shape, or a crafted
    stream (CRLF line ends, a comment, events split across writes, an error event)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        case = body.get("user", "")
        if case in SCENARIOS:
            status, payload, headers = SCENARIOS[case]
            return web.Response(status=status, body=payload, headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ev = b'data: {"id":"1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}'
        if case == "crlf":
            await resp.write(b": keep-alive\r\n\r\n" + ev[:20])
            await asyncio.sleep(0.01)
            await resp.write(ev[20:] + b"\r")
            await asyncio.sleep(0.01)
            await resp.write(b"\n\r\n" + ev + b"\r\n\r\ndata: [DONE]\r\n\r\n")
        elif case == "error_event":
            await resp.write(ev + b"\n\n")
            await resp.write(
                b'data: {"error":{"message":"context too long","type":"BadRequestError",'
                b'"param":null,"code":400}}\n\n'
            )
        elif case == "error_later":  # three reads: two plain chunks, then the error
            for piece in (ev + b"\n\n", ev + b"\n\n"):
                await resp.write(piece)
                await asyncio.sleep(0.02)
            await resp.write(b'data: {"error":{"message":"context too long","code":400}}\n\n')
        elif case == "error_first":
            await resp.write(b'data: {"object":"error","message":"oops","code":503}\n\n')
        elif case == "no_done":
            await resp.write(ev + b"\n\n")
        await resp.write_eof()
        return resp

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_error_shapes_normalised(odd_upstream: str) -> None:
    engine = await started(spec([odd_upstream], options={"health_path": "/health"}))
    try:

        async def err(case: str, stream: bool = False) -> ServingError:
            with pytest.raises(ServingError) as info:
                if stream:
                    await collect(engine, chat(stream=True, user=case))
                else:
                    await engine.complete(chat(user=case))
            return info.value

        e = await err("openai400")
        assert type(e) is InvalidRequest and e.status == 400
        assert (e.message, e.param, e.code) == ("bad temp", "temperature", "bad_value")
        e = await err("vllm_old404", stream=True)
        assert isinstance(e, UpstreamModelNotFound) and e.status == 404
        assert e.code == "model_not_found" and "does not exist" in e.message
        e = await err("fastapi422")
        assert type(e) is InvalidRequest and e.param == "messages"
        assert "Field required" in e.message
        e = await err("message429")
        assert isinstance(e, EngineOverloaded) and e.retry_after == 7 and e.message == "slow down"
        e = await err("text500")  # a body that is not a JSON error is logged, not relayed
        assert type(e) is UpstreamError and "boom" not in e.message
        assert e.message == f"The model `{MODEL}` answered HTTP 500 without an error message."
        e = await err("detail503")
        assert isinstance(e, EngineUnavailable) and e.message == "warming up"
        e = await err("auth401")
        assert type(e) is UpstreamError and "Unauthorized" in e.message
        e = await err("text504")
        assert isinstance(e, EngineTimeout)
    finally:
        await engine.stop()


async def test_stream_framing_and_error_events(odd_upstream: str) -> None:
    engine = await started(spec([odd_upstream]))
    try:
        body = await collect(engine, chat(stream=True, user="crlf"))
        ev = b'data: {"id":"1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        assert body == ev + ev
        # An error event after the first chunk is raised mid-stream, not relayed.
        got = []
        with pytest.raises(InvalidRequest, match="context too long"):
            async for b in engine.stream(chat(stream=True, user="error_event")):
                got.append(b)
        assert got == [ev]
        # An error event before any chunk surfaces from the first __anext__.
        it = engine.stream(chat(stream=True, user="error_first"))
        with pytest.raises(EngineUnavailable, match="oops"):
            await it.__anext__()
        with pytest.raises(UpstreamError, match="before \\[DONE\\]"):
            await collect(engine, chat(stream=True, user="no_done"))
    finally:
        await engine.stop()


# ---------------------------------------------------------------- endpoints and retries


async def test_least_outstanding_spreads_load(two: tuple[OpenAIEngine, list[SimServer]]) -> None:
    engine, servers = two
    before = [s.requests_total for s in servers]
    await asyncio.gather(*(engine.complete(chat()) for _ in range(10)))
    after = [s.requests_total - b for s, b in zip(servers, before, strict=True)]
    assert sum(after) == 10 and min(after) >= 3


async def test_retry_on_dead_endpoint_before_first_byte() -> None:
    servers = await sims(2)
    engine = await started(spec([s.url for s in servers], options={"health_interval_s": 60}))
    try:
        await servers[0].stop()  # health not re-checked yet: still looks healthy
        for stream in (False, True):
            if stream:
                assert b'"content"' in await collect(engine, chat(stream=True))
            else:
                assert (await engine.complete(chat())).usage is not None
        st = engine.status()
        assert [w.healthy for w in st.workers] == [False, True]
        assert "connection failed" in st.workers[0].detail
    finally:
        await engine.stop()
        await servers[1].stop()


async def test_all_endpoints_dead_is_unavailable() -> None:
    (server,) = await sims(1)
    engine = await started(spec([server.url], options={"health_interval_s": 60}))
    try:
        await server.stop()
        with pytest.raises(EngineUnavailable):
            await engine.complete(chat())
    finally:
        await engine.stop()


async def test_start_fails_without_any_healthy_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = OpenAIEngine(spec([f"http://127.0.0.1:{port}"], options={"start_timeout_s": 0.3}))
    with pytest.raises(EngineUnavailable, match="no endpoint healthy"):
        await engine.start()


async def test_no_retry_after_first_byte() -> None:
    servers = await sims(2, drop_after=2, output_tokens=10)
    engine = await started(spec([s.url for s in servers]))
    try:
        got: list[bytes] = []
        with pytest.raises(UpstreamError, match="broke the stream"):
            async for b in engine.stream(chat(stream=True, max_tokens=10)):
                got.append(b)
        # drop_after counts token chunks; the chat role chunk rides with the first one.
        assert got and b"".join(got).count(b"data: ") == 3
        assert sum(s.prompt_tokens_total for s in servers) == 2  # one upstream request
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


async def test_stall_is_a_timeout() -> None:
    (server,) = await sims(1, stall_ms=1500, stall_after=1, output_tokens=3)
    engine = await started(spec([server.url], options={"read_timeout_s": 0.3}))
    try:
        with pytest.raises(EngineTimeout):
            await collect(engine, chat(stream=True))
    finally:
        await engine.stop()
        await server.stop()


async def _cancel_case(
    run: Callable[[OpenAIEngine], Awaitable[None]],
) -> None:
    (server,) = await sims(1, itl_ms=40, output_tokens=200)
    engine = await started(spec([server.url]))
    try:
        await run(engine)
        await eventually(lambda: server.running == 0, within=1.0)
        assert engine.status().workers[0].url == server.url
    finally:
        await engine.stop()
        await server.stop()


async def test_stream_aclose_cancels_upstream() -> None:
    async def run(engine: OpenAIEngine) -> None:
        it = engine.stream(chat(stream=True, max_tokens=200))
        await it.__anext__()
        await it.__anext__()
        assert engine._endpoints[0].outstanding == 1
        await it.aclose()  # type: ignore[attr-defined]
        assert engine._endpoints[0].outstanding == 0

    await _cancel_case(run)


async def test_complete_cancel_cancels_upstream() -> None:
    async def run(engine: OpenAIEngine) -> None:
        task = asyncio.create_task(engine.complete(chat(max_tokens=200)))
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await _cancel_case(run)


# ---------------------------------------------------------------- adapters and status


async def test_adapters_on_every_endpoint(two: tuple[OpenAIEngine, list[SimServer]]) -> None:
    engine, servers = two
    await engine.load_adapter("ad1", "/adapters/ad1")
    assert engine.adapters() == ["ad1"]
    assert all(s.adapters == {"ad1": "/adapters/ad1"} for s in servers)
    out = await asyncio.gather(*(engine.complete(chat(adapter="ad1")) for _ in range(4)))
    assert {orjson.loads(o.body)["model"] for o in out} == {"ad1"}
    with pytest.raises(AdapterError, match="already loaded"):
        await engine.load_adapter("ad1", "/adapters/ad1")
    # Rollback: a worker refusing the load leaves the adapter nowhere.
    servers[1].adapters["ad2"] = "/elsewhere"
    with pytest.raises(AdapterError, match="has already been loaded"):
        await engine.load_adapter("ad2", "/adapters/ad2")
    assert "ad2" not in servers[0].adapters and "ad2" not in engine.adapters()
    del servers[1].adapters["ad2"]
    await engine.unload_adapter("ad1")
    assert engine.adapters() == [] and all(s.adapters == {} for s in servers)
    with pytest.raises(AdapterNotFound):
        await engine.unload_adapter("ad1")
    with pytest.raises(UpstreamModelNotFound):
        await engine.complete(chat(adapter="ad1"))


async def test_adapters_reapplied_when_a_worker_returns() -> None:
    servers = await sims(2)
    engine = await started(spec([s.url for s in servers]))
    try:
        await engine.load_adapter("ad1", "/a")
        port = int(servers[1].url.rsplit(":", 1)[1])
        await servers[1].stop()
        await eventually(lambda: not engine.status().workers[1].healthy)
        servers[1] = SimServer(SimConfig(model=MODEL))  # a restarted worker: no adapters
        await servers[1].start("127.0.0.1", port)
        await eventually(lambda: engine.status().workers[1].healthy)
        assert servers[1].adapters == {"ad1": "/a"}
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


async def test_metrics_scraped_into_status() -> None:
    servers = await sims(2, spec_tokens=3, max_running=1, itl_ms=30)
    engine = await started(spec([s.url for s in servers], options={"metrics_interval_s": 0.1}))
    try:
        calls = [asyncio.create_task(engine.complete(chat(max_tokens=8))) for _ in range(4)]
        await eventually(lambda: engine.status().waiting == 2)
        st = engine.status()
        assert st.ready and st.running == 2
        assert all(w.kv_cache_usage is not None and w.kv_cache_usage > 0 for w in st.workers)
        await asyncio.gather(*calls)
        await eventually(lambda: all(w.running == 0 for w in engine.status().workers))
        w = engine.status().workers[0]
        assert w.spec_draft_tokens is not None and w.spec_draft_tokens > 0
        assert w.spec_accepted_tokens is not None and w.spec_accepted_tokens > 0
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


@pytest.mark.parametrize("scorers", [{"least_outstanding": 1}, {"queue_depth": 1}])
async def test_metrics_scraped_only_as_often_as_routing_needs(scorers: dict[str, int]) -> None:
    """Without a scorer that reads the workers' load, a probe scrapes /metrics once, then
    every METRICS_IDLE_S (15 s); with one, at every probe (the sims count the GETs)."""
    servers = await sims(2)
    engine = await started(spec([s.url for s in servers], routing={"scorers": scorers}))
    try:
        await eventually(lambda: min(s.probes_total for s in servers) >= 8, within=20)
        for s in servers:
            probes, scrapes = s.probes_total, s.scrapes_total
            if "queue_depth" in scorers:
                assert scrapes >= probes - 1
            else:
                assert scrapes == 1, (probes, scrapes)
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


async def test_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    (server,) = await sims(1, api_key="sekrit")
    monkeypatch.setenv("SIM_KEY", "sekrit")
    good = await started(spec([server.url], api_key_env="SIM_KEY"))
    bad = await started(spec([server.url]))
    try:
        assert (await good.complete(chat())).usage is not None
        with pytest.raises(UpstreamError, match="credentials"):
            await bad.complete(chat())
    finally:
        await good.stop()
        await bad.stop()
        await server.stop()
    monkeypatch.delenv("SIM_KEY")
    with pytest.raises(EngineUnavailable, match="SIM_KEY"):
        await OpenAIEngine(spec([server.url], api_key_env="SIM_KEY")).start()


# ---------------------------------------------------------------- specs and the sim engine


def test_check_spec() -> None:
    cls = engine_class("openai")
    assert cls is OpenAIEngine
    assert cls.check_spec(spec(["http://h:1"])) == []
    bad = ModelSpec.model_validate({
        "name": "x", "engine": "openai", "quantization": "awq",
        "batching": {"max_sequences": 4},
        "speculative": {"method": "ngram", "num_speculative_tokens": 2},
        "options": {"bogus": 1, "read_timeout_s": -1},
    })  # fmt: skip
    paths = sorted(i.path for i in cls.check_spec(bad))
    assert paths == ["batching", "endpoints", "options.bogus", "options.read_timeout_s",
                     "quantization", "speculative"]  # fmt: skip
    sim = engine_class("sim")
    assert sim is SimEngine
    routed = ModelSpec.model_validate({
        "name": "x", "engine": "openai", "endpoints": ["http://h:1"],
        "routing": {"scorers": {"least_outstanding": 1, "queue_depth": 0.5, "bogus": 1}},
    })  # fmt: skip
    assert [i.path for i in cls.check_spec(routed)] == ["routing.scorers.bogus"]
    ok = ModelSpec(name="s", engine="sim", replicas=2, options={"ttft_ms": 5, "itl_ms": 1})
    assert sim.check_spec(ok) == []
    bad_sim = ModelSpec(name="s", engine="sim", options={"ttft": 5, "error_rate": 3})
    assert sorted(i.path for i in sim.check_spec(bad_sim)) == ["options.ttft"]
    bad_sim = ModelSpec(name="s", engine="sim", options={"error_rate": 3})
    assert [i.path for i in sim.check_spec(bad_sim)] == ["options.error_rate"]
    assert sim.launch_commands(ok) == [] and cls.launch_commands(ok) == []


async def test_sim_engine_launches_replicas() -> None:
    sp = ModelSpec.model_validate({
        "name": "simmy", "engine": "sim", "replicas": 2, "batching": {"max_sequences": 3},
        "speculative": {"method": "ngram", "num_speculative_tokens": 2},
        "lora": {"adapters": [{"name": "start-ad", "path": "/p"}]},
        "options": {"output_tokens": 4, "health_interval_s": 0.1},
    })  # fmt: skip
    engine = SimEngine(sp)
    await engine.start()
    try:
        assert [s.config.max_running for s in engine.servers] == [3, 3]
        assert engine.adapters() == ["start-ad"]
        assert all(s.adapters == {"start-ad": "/p"} for s in engine.servers)
        req = chat(stream=True)
        req.body["model"] = "simmy"
        body = await collect(engine, req)
        assert body.count(b'"content":" ') == 4 and b'"model":"simmy"' in body
        st = engine.status()
        assert st.ready and len(st.workers) == 2
    finally:
        await engine.stop()
    assert engine.servers == []


# ---------------------------------------------------------------- the direct path


async def _relay_both(
    engine: OpenAIEngine, req: GenerateRequest, take: Callable[[int], bool]
) -> list[tuple[str, bytes]]:
    """Blocks in the order a client would get them: ("direct", b) for those the engine
    passed to `req.direct` (which takes the n-th offer when `take(n)`), ("loop", b) for
    those it yielded."""
    got: list[tuple[str, bytes]] = []
    offers = 0

    def direct(block: bytes) -> bool:
        nonlocal offers
        offers += 1
        if not take(offers):
            return False
        got.append(("direct", block))
        return True

    req.direct = direct
    async for block in engine.stream(req):
        got.append(("loop", block))
    return got


async def test_direct_path_keeps_bytes_and_order() -> None:
    (sim,) = await sims(1, output_tokens=6, itl_ms=5)  # one read per chunk
    engine = await started(spec([sim.url]))
    try:
        await _direct_cases(engine)
    finally:
        await engine.stop()
        await sim.stop()


async def _direct_cases(engine: OpenAIEngine) -> None:
    plain = await collect(engine, chat(stream=True, max_tokens=6))
    # Taking every offer: each chunk after the first (which came with the headers) goes
    # direct; the usage chunk is never offered, and [DONE] never relayed.
    got = await _relay_both(engine, chat(stream=True, max_tokens=6), lambda n: True)
    assert _norm(b"".join(b for _, b in got)) == _norm(plain)
    paths = [p for p, _ in got]
    assert paths[0] == "loop" and paths.count("direct") >= 5 and paths[-1] == "loop", paths
    assert b'"usage"' in got[-1][1] and all(b'"usage"' not in b for p, b in got if p == "direct")
    assert all(b.count(b"\n\n") == 1 for p, b in got if p == "direct")
    assert all(b"[DONE]" not in b for _, b in got)
    # Declining every other offer: the declined block is yielded, in its place.
    got = await _relay_both(engine, chat(stream=True, max_tokens=6), lambda n: n % 2 == 0)
    assert _norm(b"".join(b for _, b in got)) == _norm(plain)
    assert {"direct", "loop"} <= {p for p, _ in got}


async def test_direct_path_leaves_odd_runs_to_the_loop(odd_upstream: str) -> None:
    engine = await started(spec([odd_upstream]))
    try:
        ev = b'data: {"id":"1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        # CRLF line ends, a comment and events split across writes are never offered whole.
        got = await _relay_both(engine, chat(stream=True, user="crlf"), lambda n: True)
        assert got == [("loop", ev + ev)]
        # The plain chunk after the first goes direct; the error event after it is still
        # raised (the first chunk came with the headers: the loop's).
        taken: list[bytes] = []
        req = chat(stream=True, user="error_later")
        req.direct = lambda b: taken.append(b) is None
        yielded = []
        with pytest.raises(InvalidRequest, match="context too long"):
            async for b in engine.stream(req):
                yielded.append(b)
        assert (yielded, taken) == ([ev], [ev])
    finally:
        await engine.stop()


async def test_a_renaming_engine_offers_nothing(two: tuple[OpenAIEngine, list[SimServer]]) -> None:
    _, servers = two
    engine = await started(spec([servers[0].url], name="alias", served_model_name=MODEL))
    try:
        got = await _relay_both(engine, chat(stream=True, max_tokens=4), lambda n: True)
        assert {p for p, _ in got} == {"loop"}
        assert all(b'"model":"alias"' in b for _, b in got if b'"choices":[{' in b)
    finally:
        await engine.stop()
