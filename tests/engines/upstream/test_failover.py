"""Failure handling of the upstream engine against real simulator workers with their fault
injection: retries before the first byte, the retry budget (a burst at a fault retried in
full, a sustained failure held to the budget), outlier ejection (5xx answers too) with
half-open re-admission, backpressure that never ejects, panic routing when too many
workers are ejected, the fast-fail 503 with Retry-After, first-byte timeouts and wedged
workers (whose streams a model with continue_streams continues elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
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
        # Retries ≤ retry_budget_min + ratio × requests (the budget's reserve, 3).
        assert n < attempts <= n + 0.2 * n + 3
        assert engine.status().counters["retry_budget_exhausted"] > 0
    finally:
        await _close(engine, servers)


async def test_total_outage_fails_fast_without_touching_workers() -> None:
    servers = await sims(2)
    for s in servers:
        s.reconfigure(error_rate=1.0, error_status=500)
    # Panic routing off: with it (the default) the ejected workers would still be tried.
    engine = await _engine(servers, eject_after_failures=1, eject_base_s=30, panic_threshold=None)
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


# ---------------------------------------------------------------- the retry budget


def test_retry_budget_is_a_token_bucket_with_a_time_to_live() -> None:
    """Deposits and withdrawals live `ttl_s`; nothing resets at a window's edge (the old
    tumbling window allowed 3 retries right after each roll, whatever came before)."""
    from engines.upstream.outliers import RetryBudget

    b = RetryBudget(0.2, 3, ttl_s=10.0)
    b.requests = 100
    b.roll(now=0.0)  # 100 requests deposit 20 retries
    b.roll(now=9.0)  # the old window would have reset here
    assert [b.try_retry(now=9.5) for _ in range(24)] == [True] * 23 + [False]
    assert b.retries_total == 23 and b.exhausted == 1
    # The deposits expire at 10 s; the withdrawals at 19.5 s, then the reserve is back.
    assert b.available(now=10.0) == 3 - 23
    assert not b.try_retry(now=19.0)
    assert b.available(now=19.5) == 3
    assert [b.try_retry(now=20.0) for _ in range(4)] == [True, True, True, False]


async def _clients(engine: OpenAIEngine, clients: int, each: int) -> list[BaseException | None]:
    """`clients` concurrent clients, `each` requests one after another (half streamed);
    the error of each request that failed, None for each that succeeded."""
    out: list[BaseException | None] = []

    async def client(i: int) -> None:
        for k in range(each):
            try:
                if (i + k) % 2:
                    assert b'"content"' in await collect(engine, chat(stream=True))
                else:
                    assert (await engine.complete(chat())).usage is not None
                out.append(None)
            except ServingError as e:
                out.append(e)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return out


async def test_a_worker_that_starts_resetting_under_50_clients_loses_no_request() -> None:
    """The issue's trial: a worker starts resetting connections under load right after
    the budget rolled. Every request succeeds on the other worker: the burst of failed
    first attempts (well above the reserve of 3) is retried in full."""
    servers = await sims(2, itl_ms=1)
    dead = servers[0]
    engine = await _engine(servers, eject_after_failures=20, health_interval_s=60)
    try:
        assert await _clients(engine, 50, 4) == [None] * 200  # load before the fault
        engine.budget.roll()  # where the old window reset both counts
        served, reached = servers[1].requests_total, dead.received_total
        dead.reconfigure(drop_after=0)  # accepts, reads the request, resets
        results = await _clients(engine, 50, 4)
        assert results == [None] * 200
        assert servers[1].requests_total - served == 200
        # Every request whose first attempt failed was retried (each failed attempt also
        # reached the worker on a fresh connection after a reused one was reset: the pool's
        # stale-connection retry), far more than the reserve alone would have allowed.
        retries = engine.status().counters["retries"]
        assert 3 < retries <= dead.received_total - reached
        assert engine.status().counters["retry_budget_exhausted"] == 0
        assert engine._endpoints[0].ejected
    finally:
        await _close(engine, servers)


async def test_a_sustained_failure_under_50_clients_stays_within_the_budget() -> None:
    """A worker that resets every request and is never ejected: retries stay within 20 %
    of the requests + the reserve of 3, so the failure cannot amplify the load."""
    servers = await sims(2, itl_ms=1)
    servers[0].reconfigure(drop_after=0)
    engine = await _engine(servers, eject_after_failures=10**6, health_interval_s=0.1)
    try:
        results = await _clients(engine, 50, 8)
        n = len(results)
        retries = engine.status().counters["retries"]
        assert retries <= 0.2 * n + 3
        attempts = sum(s.received_total for s in servers)
        assert attempts == n + retries
        # The rest of the failed first attempts were refused a retry, and said so.
        failed = [r for r in results if r is not None]
        assert failed and all(isinstance(r, EngineUnavailable) for r in failed)
        assert servers[0].received_total == retries + len(failed)
        assert engine.status().counters["retry_budget_exhausted"] == len(failed)
    finally:
        await _close(engine, servers)


# ---------------------------------------------------------------- panic routing


async def test_one_worker_of_one_ejected_keeps_serving_in_panic_mode() -> None:
    """A lone worker that answered a few 5xx is ejected; requests keep reaching it (panic
    routing) instead of minutes of 503, and the counters say so."""
    (server,) = await sims(1)
    server.reconfigure(error_rate=1.0, error_status=500)
    engine = await _engine([server], eject_after_failures=2, eject_base_s=60)
    try:
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await engine.complete(chat())
        assert engine._endpoints[0].ejected
        server.reconfigure(error_rate=0.0)  # the fault is over; the ejection is not
        for i in range(6):
            req = chat(stream=bool(i % 2))
            if i % 2:
                assert b'"content"' in await collect(engine, req)
            else:
                assert (await engine.complete(req)).usage is not None
        assert server.requests_total == 6
        st = engine.status()
        assert st.workers[0].ejected and st.counters["panic_routes"] == 6
        # Still taking requests, so ready (a readiness probe must not pull the gateway).
        assert st.ready and st.detail == "0/1 endpoints serving, panic routing over 1 ejected"
        assert st.counters["fast_fails"] == 0 and engine.router.decisions["panic"] == 6
    finally:
        await _close(engine, [server])


async def test_panic_threshold_below_one_routes_over_ejected_workers_too() -> None:
    """`panic_threshold: 0.5`: with 2 of 4 workers ejected, all four take requests; at the
    default (1) the two left take them all."""
    for threshold, reach_ejected in ((0.5, True), (1.0, False)):
        servers = await sims(4)
        for s in servers[:2]:
            s.reconfigure(error_rate=1.0, error_status=500)
        engine = await _engine(
            servers, eject_after_failures=1, eject_base_s=60, panic_threshold=threshold
        )
        try:
            while not (engine._endpoints[0].ejected and engine._endpoints[1].ejected):
                with contextlib.suppress(UpstreamError):
                    await engine.complete(chat())
            for s in servers[:2]:
                s.reconfigure(error_rate=0.0)
            before = [s.requests_total for s in servers]
            for _ in range(12):
                await engine.complete(chat())
            served = [s.requests_total - b for s, b in zip(servers, before, strict=True)]
            panics = engine.status().counters["panic_routes"]
            if reach_ejected:
                assert served[0] > 0 and served[1] > 0 and panics == 12
            else:
                assert served[:2] == [0, 0] and panics == 0 and sum(served) == 12
        finally:
            await _close(engine, servers)
