"""Tests for `gateway bench` (gateway/loadgen): real HTTP against a loopback upstream.

The upstream here is a small aiohttp server written for these tests: it answers OpenAI
chat and completions requests with SSE chunks at delays the request asks for (extra body
fields `t_ttft_ms`, `t_itl_ms`), can split events across TCP writes, and fails every k-th
request with a 500. Nothing of the load generator is mocked; timings are checked within
tolerances wide enough for a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from loadgen import LoadConfig, RequestRecord, Stats, run_load, summarize
from loadgen import cli as bench_cli
from loadgen.client import _StreamState
from simulator import SimConfig, SimServer

MODEL = "fixture-model"


def _sse(obj: dict[str, Any] | str) -> bytes:
    payload = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return b"data: " + payload + b"\n\n"


def _chunk(endpoint: str, text: str | None, role: bool = False) -> dict[str, Any]:
    if endpoint == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": None}
        obj = "text_completion"
    return {"id": "x", "object": obj, "created": 1, "model": MODEL, "choices": [choice]}


class Upstream:
    """The fixture server and its request counter."""

    def __init__(self) -> None:
        self.count = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.generate)
        self.app.router.add_post("/v1/completions", self.generate)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        endpoint = "chat" if request.path.endswith("chat/completions") else "completions"
        n = int(body.get("max_tokens", 4))
        ttft = body.get("t_ttft_ms", 0) / 1000
        itl = body.get("t_itl_ms", 0) / 1000
        fail_every = body.get("t_fail_every", 0)
        if fail_every and next(self.count) % fail_every == 0:
            err = {
                "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
            }
            return web.json_response(err, status=500)
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        if not body.get("stream"):
            await asyncio.sleep(ttft + itl * (n - 1))
            if endpoint == "chat":
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": " tok" * n},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": " tok" * n, "finish_reason": "length"}
            return web.json_response(
                {"id": "x", "object": "x", "model": MODEL, "choices": [choice], "usage": usage}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if endpoint == "chat":  # role-only chunk first, as vLLM sends: must not count as TTFT
            await resp.write(_sse(_chunk(endpoint, None, role=True)))
        await asyncio.sleep(ttft)
        for i in range(n):
            if i:
                await asyncio.sleep(itl)
            data = _sse(_chunk(endpoint, f" t{i}"))
            if body.get("t_split"):  # an event spanning two reads
                await resp.write(data[:9])
                await asyncio.sleep(0.003)
                data = data[9:]
            await resp.write(data)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_sse({"id": "x", "object": "x", "choices": [], "usage": usage}))
        await resp.write(_sse("[DONE]"))
        await resp.write_eof()
        return resp


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[str]:
    runner = web.AppRunner(Upstream().app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _cfg(base_url: str, **kw: Any) -> LoadConfig:
    kw.setdefault("progress", False)
    kw.setdefault("model", MODEL)
    return LoadConfig(base_url=base_url, **kw)


# --------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------


def test_percentiles_match_linear_interpolation() -> None:
    st = Stats.of_seconds([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert st.count == 100
    assert st.mean == pytest.approx(50.5)
    assert st.p50 == pytest.approx(50.5)
    assert st.p90 == pytest.approx(90.1)
    assert st.p99 == pytest.approx(99.01)
    assert st.min == pytest.approx(1.0) and st.max == pytest.approx(100.0)
    empty = Stats.of_seconds([])
    assert empty.count == 0 and empty.p99 == 0.0


def test_tpot_and_summary_arithmetic() -> None:
    a = RequestRecord(ok=True, ttft=0.050, latency=0.130, output_tokens=5, itl=[0.02] * 4)
    b = RequestRecord(ok=True, ttft=0.070, latency=0.070, output_tokens=1)  # no TPOT
    c = RequestRecord(ok=False, error="http_500")
    assert a.tpot == pytest.approx(0.020)
    assert b.tpot is None and c.tpot is None
    s = summarize([a, b, c], duration_s=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"http_500": 1})
    assert s["tpot_ms"]["count"] == 1 and s["tpot_ms"]["mean"] == pytest.approx(20.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(60.0)
    assert s["itl_ms"]["count"] == 4
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.0)


@pytest.mark.parametrize("crlf", [False, True])
def test_sse_events_split_at_every_byte(crlf: bool) -> None:
    events = [
        _sse(_chunk("chat", None, role=True)),
        b": keep-alive comment\n\n",
        _sse(_chunk("chat", "Hel")),
        b"event: message\ndata: " + orjson.dumps(_chunk("chat", "lo")) + b"\n\n",
        _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}),
        _sse("[DONE]"),
    ]
    stream = b"".join(events)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    for cut in range(1, len(stream)):
        rec = RequestRecord(start=0.0, chunks=[])
        st = _StreamState(rec)
        st.feed(stream[:cut], 1.0)
        st.feed(stream[cut:], 2.0)
        st.finish(3.0)
        assert st.done, cut
        assert rec.output_chunks == 2, cut
        assert (rec.output_tokens, rec.prompt_tokens, rec.usage_seen) == (9, 3, True)
        assert rec.chunks is not None and len(rec.chunks) == 4  # role, 2 content, usage
        assert rec.ttft in (1.0, 2.0)


# --------------------------------------------------------------------------------------
# Against the fixture upstream
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_streamed_timings(upstream: str, endpoint: str) -> None:
    ttft_ms, itl_ms, n = 60, 25, 6
    cfg = _cfg(
        upstream,
        endpoint=endpoint,  # type: ignore[arg-type]
        concurrency=4,
        num_requests=8,
        max_tokens=n,
        extra_body={"t_ttft_ms": ttft_ms, "t_itl_ms": itl_ms},
    )
    result = await run_load(cfg)
    s = result.summary()
    assert s["completed"] == 8 and s["failed"] == 0
    assert s["total_output_tokens"] == 8 * n  # from usage
    assert s["usage_reported"] == 8
    assert s["itl_ms"]["count"] == 8 * (n - 1)
    # Floors only (a busy machine stretches time, never shrinks it); the definitions
    # themselves are checked exactly per record below.
    assert s["ttft_ms"]["p50"] >= ttft_ms
    assert s["itl_ms"]["p50"] >= itl_ms / 2
    assert s["tpot_ms"]["mean"] >= itl_ms - 2
    e2e = ttft_ms + (n - 1) * itl_ms
    assert s["e2el_ms"]["p50"] >= e2e
    for rec in result.records:
        assert rec.ttft is not None and rec.latency is not None
        assert rec.tpot == pytest.approx((rec.latency - rec.ttft) / (n - 1))
        assert sum(rec.itl) == pytest.approx(rec.latency - rec.ttft)
    # Eight requests at concurrency 4: about two rounds of one request each.
    assert s["duration_s"] * 1000 >= 2 * e2e


async def test_events_spanning_reads(upstream: str) -> None:
    cfg = _cfg(upstream, num_requests=3, max_tokens=4, extra_body={"t_split": True})
    s = (await run_load(cfg)).summary()
    assert s["completed"] == 3 and s["total_output_chunks"] == 12


async def test_non_streamed(upstream: str) -> None:
    cfg = _cfg(
        upstream,
        stream=False,
        concurrency=2,
        num_requests=4,
        max_tokens=5,
        extra_body={"t_ttft_ms": 30, "t_itl_ms": 10},
    )
    result = await run_load(cfg)
    s = result.summary()
    assert s["completed"] == 4 and s["total_output_tokens"] == 20
    for rec in result.records:
        assert rec.ttft == rec.latency
    assert s["ttft_ms"] == s["e2el_ms"]
    # TTFT 30 ms + 4 gaps of 10 ms: time only stretches on a busy machine, so a floor.
    assert s["e2el_ms"]["p50"] >= 70
    assert s["itl_ms"]["count"] == 0


async def test_errors_counted_by_status(upstream: str) -> None:
    cfg = _cfg(
        upstream, concurrency=3, num_requests=12, max_tokens=2, extra_body={"t_fail_every": 3}
    )
    result = await run_load(cfg)
    s = result.summary()
    assert s["requests"] == 12
    assert (s["completed"], s["failed"]) == (8, 4)
    assert s["errors"] == {"http_500": 4}
    failed = [r for r in result.records if not r.ok]
    assert all(r.status == 500 and "boom" in (r.error_detail or "") for r in failed)


async def test_unreachable_target_is_an_error_not_a_crash() -> None:
    cfg = _cfg("http://127.0.0.1:9", num_requests=2)  # port 9 (discard): nothing listens
    s = (await run_load(cfg)).summary()
    assert s["failed"] == 2 and s["completed"] == 0
    assert list(s["errors"]) == ["ClientConnectorError"]


async def test_poisson_arrivals_and_duration_bound(upstream: str) -> None:
    cfg = _cfg(upstream, concurrency=8, request_rate=100.0, num_requests=30, max_tokens=2)
    result = await run_load(cfg)
    starts = sorted(r.start for r in result.records)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert result.summary()["completed"] == 30
    # 29 exponential gaps with mean 10 ms (seeded): arrivals are spread out, not a burst
    # (a floor only: a busy machine stretches gaps, never shrinks them).
    assert sum(gaps) / len(gaps) > 0.004
    assert sum(g > 0 for g in gaps) == 29

    timed = _cfg(
        upstream, concurrency=2, duration_s=0.3, max_tokens=2, extra_body={"t_ttft_ms": 20}
    )
    s = (await run_load(timed)).summary()
    assert s["completed"] >= 4 and s["failed"] == 0
    assert s["duration_s"] < 0.3 + 0.2


async def test_model_discovered_from_models_endpoint(upstream: str) -> None:
    cfg = LoadConfig(base_url=upstream + "/v1/", num_requests=1, max_tokens=1, progress=False)
    result = await run_load(cfg)
    assert result.model == MODEL and result.summary()["completed"] == 1


async def test_cli_sweep_writes_table_json_and_plots(
    upstream: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "out" / "bench.json"
    plot_dir = tmp_path / "plots"
    argv = [
        "--base-url", upstream, "--model", MODEL, "--concurrency", "1,4",
        "--num-requests", "8", "--max-tokens", "4", "--warmup", "2",
        "--extra-body", '{"t_itl_ms": 2}', "--json", str(json_path),
        "--plot-dir", str(plot_dir), "--no-progress",
    ]  # fmt: skip
    # The CLI runs its own event loop, so it goes on a thread next to the fixture's loop.
    rc = await asyncio.to_thread(bench_cli.main, argv)
    assert rc == 0
    out = capsys.readouterr().out
    assert "Benchmark result" in out and "Mean TTFT (ms):" in out and "P99 ITL (ms):" in out
    assert "conc" in out  # the sweep table
    doc = orjson.loads(json_path.read_bytes())
    assert [run["summary"]["concurrency"] for run in doc["runs"]] == [1, 4]
    assert all(run["summary"]["completed"] == 8 for run in doc["runs"])
    assert len(doc["runs"][1]["requests"]) == 8
    assert doc["runs"][0]["requests"][0]["itl_ms"]  # per-request gaps are kept
    for name in ("latency.png", "throughput.png"):
        data = (plot_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench_cli.main(["--base-url", "http://x", "--concurrency", "0"])
    with pytest.raises(SystemExit):
        bench_cli.main(["--base-url", "http://x", "--num-requests", "3", "--duration", "1"])
    assert math.isinf(bench_cli._rate("inf"))


# --------------------------------------------------------------------------------------
# Against the simulator
# --------------------------------------------------------------------------------------


async def test_against_simulator() -> None:
    server = SimServer(SimConfig(ttft_ms=20, itl_ms=5, output_tokens=8))
    base_url = await server.start("127.0.0.1", 0)
    try:
        for stream in (True, False):
            cfg = LoadConfig(
                base_url=base_url, concurrency=4, num_requests=8, max_tokens=8,
                stream=stream, progress=False,
            )  # fmt: skip
            s = (await run_load(cfg)).summary()
            assert s["completed"] == 8, s["errors"]
            assert s["total_output_tokens"] == 64
            assert s["ttft_ms"]["p50"] >= 20
            if stream:
                assert s["itl_ms"]["p50"] >= 4.5
    finally:
        await server.stop()
