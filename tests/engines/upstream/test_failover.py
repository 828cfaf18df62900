"""Failure handling of the upstream engine against real simulator workers with their fault
injection: retries before the first byte, the retry budget, outlier ejection (5xx answers
too) with half-open re-admission, backpressure that never ejects, the fast-fail 503 with
Retry-After, first-byte timeouts and wedged workers (whose streams a model with
continue_streams continues elsewhere)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from engines.base import EngineTimeout, EngineUnavailable, ServingError, UpstreamError
from engines.upstream.engine import OpenAIEngine
from simulator import SimServer
from tests.engines.upstream.test_engine import chat, collect, eventually, sims, spec, started


async def _engine(servers: list[SimServer], **options: Any) -> OpenAIEngine:
    return await started(spec([s.url for s in servers], options=options))


async def _close(engine: OpenAIEngine, servers: list[SimServer]) -> None:
    await engine.stop()
    for s in servers:
        await s.stop()


async def test_killed_before_headers_fails_over_and_the_retry_never_returns_there() -> None:
    servers = await sims(3)
    dead = servers[0]
    dead.reconfigure(drop_after=0)  # accepts, reads the request, closes before headers
    engine = await _engine(servers, eject_after_failures=3, health_interval_s=60)
    live = {servers[1].url, servers[2].url}
    try:
        retried = 0
        for i in range(12):
            req = chat(stream=bool(i % 2))
            if i % 2:
                assert b'"content"' in await collect(engine, req)
            else:
                assert (await engine.complete(req)).usage is not None
            # The request notes who answered and how many attempts failed first (the
            # gateway's access log reads these).
            assert req.worker in live and req.retries in (0, 1)
            retried += req.retries
        # Every request succeeded; the dead worker saw at most the threshold, each a first
        # attempt (a retry goes to a worker not yet tried), then it was ejected.
        assert dead.received_total == 3
        st = engine.status()
        assert st.workers[0].ejected and st.workers[0].ejections == 1
        assert "connection reset" in st.workers[0].last_error
        assert st.counters["retries"] == 3 == retried
        assert servers[1].requests_total + servers[2].requests_total == 12
    finally:
        await _close(engine, servers)


async def test_stall_before_first_byte_is_retried_elsewhere() -> None:
    servers = await sims(2)
    servers[0].reconfigure(stall_ms=5000, stall_after=0)
    engine = await _engine(servers, first_byte_timeout_s=0.2, eject_after_failures=2)
    try:
        for _ in range(6):
            assert b'"content"' in await collect(engine, chat(stream=True))
        assert servers[1].requests_total == 6
        assert engine.status().counters["retries"] == 2
        assert engine._endpoints[0].ejected
        assert "first byte timeout" in engine.status().workers[0].last_error
    finally:
        await _close(engine, servers)


async def test_worker_answering_500_with_healthy_health_is_ejected_then_readmitted() -> None:
    servers = await sims(2)
    bad = servers[0]
    bad.reconfigure(error_rate=1.0, error_status=500)
    engine = await _engine(servers, eject_after_failures=3, eject_base_s=0.3)
    try:
        failed = []
        for _ in range(30):
            try:
                await engine.complete(chat())
            except ServingError as e:
                failed.append(e)
        # A 500 is not retried (it may be the request's fault), but it counts: three in a
        # row eject the worker, and everything after goes to the good one.
        assert len(failed) == 3 and all(isinstance(r, UpstreamError) for r in failed)
        assert bad.received_total == 3
        st = engine.status().workers[0]
        assert st.ejected and st.healthy and "answered 500" in st.last_error
        for _ in range(10):
            await engine.complete(chat())
        assert bad.received_total == 3
        # Fixed: after the ejection time a passing health probe re-admits it half-open;
        # its first success ends the streak.
        bad.reconfigure(error_rate=0.0)
        await eventually(lambda: not engine._endpoints[0].ejected, within=5)
        assert engine._endpoints[0].half_open
        await eventually(lambda: _one_more(engine, bad), within=5)
        assert not engine._endpoints[0].half_open and engine._endpoints[0].eject_streak == 0
    finally:
        await _close(engine, servers)


def _one_more(engine: OpenAIEngine, server: SimServer) -> bool:
    before = server.requests_total
    asyncio.get_running_loop().create_task(engine.complete(chat()))
    return before > 0 and not engine._endpoints[0].half_open


async def test_half_open_failure_ejects_again_for_longer() -> None:
    servers = await sims(2)
    bad = servers[0]
    bad.reconfigure(error_rate=1.0, error_status=502)
    engine = await _engine(servers, eject_after_failures=2, eject_base_s=0.2)
    try:
        for _ in range(6):
            await engine.complete(chat())  # 502 is retried on the other worker
        ep = engine._endpoints[0]
        assert ep.ejected and ep.ejections == 1
        first_len = ep.ejected_until
        await eventually(lambda: ep.half_open, within=5)
        readmitted_at = asyncio.get_running_loop().time()
        while not ep.ejected:
            await engine.complete(chat())
        assert ep.ejections == 2 and ep.eject_streak == 2
        # The second ejection lasts twice the first (0.4 s vs 0.2 s).
        assert ep.ejected_until - readmitted_at > 0.3 and ep.ejected_until > first_len
    finally:
        await _close(engine, servers)


async def test_backpressure_never_ejects() -> None:
    servers = await sims(2)
    servers[0].reconfigure(error_rate=1.0, error_status=429)
    engine = await _engine(servers, eject_after_failures=2)
    try:
        results = await asyncio.gather(
            *(engine.complete(chat()) for _ in range(20)), return_exceptions=True
        )
        overloaded = [r for r in results if isinstance(r, ServingError)]
        assert overloaded and all(r.status == 429 for r in overloaded)
        assert not engine._endpoints[0].ejected and engine._endpoints[0].failures == 0
    finally:
        await _close(engine, servers)


async def test_retry_budget_under_sustained_503() -> None:
    servers = await sims(3)
    for s in servers:
        s.reconfigure(error_rate=1.0, error_status=503)
    # Ejection off in effect, so only the budget limits the retries.
    engine = await _engine(servers, eject_after_failures=10_000, health_interval_s=60)
    try:
        n = 200
        for _ in range(n):
            with pytest.raises(EngineUnavailable) as e:
                await engine.complete(chat())
            assert e.value.retry_after == 1.0  # the worker's own Retry-After
        attempts = sum(s.received_total for s in servers)
        assert n < attempts <= 1.2 * n
        assert engine.status().counters["retry_budget_exhausted"] > 0
    finally:
        await _close(engine, servers)


async def test_total_outage_fails_fast_without_touching_workers() -> None:
    servers = await sims(2)
    for s in servers:
        s.reconfigure(error_rate=1.0, error_status=500)
    engine = await _engine(servers, eject_after_failures=1, eject_base_s=30)
    try:
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await engine.complete(chat())
        assert all(ep.ejected for ep in engine._endpoints)
        received = [s.received_total for s in servers]
        for _ in range(50):
            with pytest.raises(EngineUnavailable) as e:
                await engine.complete(chat())
            assert e.value.retry_after >= 1
        assert [s.received_total for s in servers] == received
        assert not engine.status().ready and engine.status().counters["fast_fails"] == 50
    finally:
        await _close(engine, servers)


async def test_wedged_worker_is_ejected_and_its_streams_end_with_an_error() -> None:
    servers = await sims(2, itl_ms=5, output_tokens=50)
    wedged = servers[0]
    engine = await _engine(servers, read_timeout_s=60, health_timeout_s=0.3, health_interval_s=0.1)
    try:
        wedged.reconfigure(stall_ms=60_000, stall_after=2)
        streams = [engine.stream(chat(stream=True, max_tokens=50)) for _ in range(4)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))  # type: ignore[attr-defined]
        assert all(firsts)
        on_wedged = engine._endpoints[0].outstanding
        assert on_wedged >= 1
        wedged.reconfigure(hang_health=True)

        async def drain(it: Any) -> str:
            try:
                async for _ in it:
                    pass
            except UpstreamError as e:
                return e.message
            return "ok"

        outcomes = await asyncio.gather(*(drain(s) for s in streams))
        # Failed by the wedge detector, long before the 60 s read timeout.
        assert sum("broke the stream" in o for o in outcomes) == on_wedged
        assert outcomes.count("ok") == 4 - on_wedged
        ep = engine._endpoints[0]
        assert ep.ejected and not ep.healthy and engine.status().counters["wedged"] >= 1
        assert "wedged" in ep.last_error
    finally:
        await _close(engine, servers)


async def test_stall_mid_stream_is_an_idle_timeout_counted_as_failure() -> None:
    (server,) = await sims(1, stall_ms=3000, stall_after=2, output_tokens=5)
    engine = await _engine([server], read_timeout_s=0.3)
    try:
        with pytest.raises(EngineTimeout):
            await collect(engine, chat(stream=True))
        assert engine._endpoints[0].failures == 1
        assert engine._endpoints[0].last_error == "stalled mid-stream"
    finally:
        await _close(engine, [server])


def _content(stream: bytes) -> tuple[str, set[str]]:
    """The text of a chat stream's deltas, and the ids of its chunks."""
    text, ids = [], set()
    for event in stream.split(b"\n\n"):
        if event.startswith(b"data: {"):
            obj = json.loads(event[6:])
            ids.add(obj["id"])
            for choice in obj["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text), ids


async def test_streams_of_a_wedged_worker_are_continued_when_the_model_opts_in() -> None:
    servers = await sims(3, itl_ms=5, output_tokens=50)
    wedged = servers[0]
    engine = await _engine(
        servers,
        read_timeout_s=60,
        health_timeout_s=0.3,
        health_interval_s=0.1,
        continue_streams=True,
        forward_request_id=False,
    )
    try:
        wedged.reconfigure(stall_ms=60_000, stall_after=2)
        streams = [engine.stream(chat(stream=True, max_tokens=50)) for _ in range(6)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))  # type: ignore[attr-defined]
        on_wedged = engine._endpoints[0].outstanding
        assert on_wedged >= 1
        wedged.reconfigure(hang_health=True)

        async def rest(first: bytes, it: Any) -> bytes:
            return first + b"".join([b async for b in it])

        outcomes = await asyncio.gather(*(rest(f, s) for f, s in zip(firsts, streams, strict=True)))
        # Every stream is whole: the uninterrupted greedy answer, under one id.
        want = wedged.text(0, 50)
        for raw in outcomes:
            text, ids = _content(raw)
            assert text == want and len(ids) == 1
        assert engine.status().counters["continuations"] == on_wedged
        assert engine._endpoints[0].ejected and engine.status().counters["wedged"] >= 1
    finally:
        await _close(engine, servers)
