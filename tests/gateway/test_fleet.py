"""The fleet through a real gateway, driven with the official `openai` SDK and httpx:
failover before the first byte, the retry budget under sustained 503, a lone ejected
worker that keeps serving (panic routing), the total-outage fast-fail with Retry-After (panic
routing off), a dead model that leaves the gateway ready and the other model serving (then
comes back by itself), and a pool that mixes vLLM and LMDeploy workers routed by their
queues."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from simulator import SimServer
from tests.conftest import ADMIN_KEY, free_port, start_gateway, start_pool
from tests.gateway.test_api_sim import CHAT, SimThread

FAST = {"health_interval_s": 0.1, "start_timeout_s": 3.0}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def sims() -> Iterator[SimThread]:
    t = SimThread()
    yield t
    t.close()


def _stop(sims: SimThread, servers: list[SimServer]) -> None:
    for s in servers:
        sims.call(s.stop())


def test_worker_killed_before_headers_clients_all_get_200(sims: SimThread, tmp_path: Path) -> None:
    workers = [sims.start(model="m", itl_ms=1) for _ in range(3)]
    dead = workers[0]
    dead.reconfigure(drop_after=0)
    options = {**FAST, "eject_after_failures": 3, "health_interval_s": 60}
    gw = start_pool(workers, options, tmp_path)
    try:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
            for i in range(20):
                if i % 2:
                    text = "".join(
                        c.choices[0].delta.content or ""
                        for c in client.chat.completions.create(
                            model="m", messages=CHAT, max_tokens=3, stream=True
                        )
                    )
                    assert len(text.split()) == 3
                else:
                    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=3)
                    assert r.choices[0].message.content
        # Each of its 3 attempts was a first attempt (a retry goes to a worker not yet
        # tried); then it was ejected and got nothing more.
        assert dead.received_total == 3
        assert workers[1].requests_total + workers[2].requests_total == 20
        health = httpx.get(f"{gw.url}/health", headers=ADMIN).json()
        w0 = health["models"]["m"]["workers"]["list"][0]
        assert w0["state"] == "ejected" and w0["ejections"] == 1
        assert "reset" in w0["last_error"]
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'gateway_engine_events_total{event="retries",model="m"} 3.0' in metrics
        assert f'gateway_worker_ejected{{model="m",worker="{dead.url}"}} 1.0' in metrics
        # One routing decision per attempt: 20 first picks and the 3 retries.
        decisions = {
            line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('gateway_routing_decisions_total{model="m"')
        }
        assert decisions["retry"] == 3 and sum(decisions.values()) == 23
    finally:
        gw.stop()
        _stop(sims, workers)


def test_sustained_503_costs_at_most_1_2_attempts_per_request(
    sims: SimThread, tmp_path: Path
) -> None:
    workers = [sims.start(model="m", error_rate=1.0, error_status=503) for _ in range(3)]
    options = {**FAST, "eject_after_failures": 100_000}
    gw = start_pool(workers, options, tmp_path)
    try:
        n = 150
        with httpx.Client(base_url=gw.url) as http:
            for _ in range(n):
                r = http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"  # the worker's own
                assert r.json()["error"]["type"] == "service_unavailable"
        attempts = sum(w.received_total for w in workers)
        # 1.2 per request, plus the budget's reserve of 3 retries per window.
        assert n < attempts <= 1.2 * n + 3
    finally:
        gw.stop()
        _stop(sims, workers)


def test_a_lone_ejected_worker_keeps_serving_in_panic_mode(sims: SimThread, tmp_path: Path) -> None:
    """One worker of one answers a few 500s and is ejected: requests keep reaching it
    (panic routing, the default `panic_threshold: 1`), and /metrics says so."""
    (worker,) = workers = [sims.start(model="m", error_rate=1.0, error_status=500)]
    options = {**FAST, "eject_after_failures": 2, "eject_base_s": 60}
    gw = start_pool(workers, options, tmp_path)
    try:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
            for _ in range(2):
                with pytest.raises(openai.APIStatusError):
                    client.chat.completions.create(model="m", messages=CHAT, max_tokens=3)
            worker.reconfigure(error_rate=0.0)  # the fault is over, the ejection is not
            for _ in range(5):
                r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=3)
                assert r.choices[0].message.content
        assert worker.requests_total == 5
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'gateway_engine_events_total{event="panic_routes",model="m"} 5.0' in metrics
        assert 'gateway_routing_decisions_total{model="m",reason="panic"} 5.0' in metrics
        assert f'gateway_worker_ejected{{model="m",worker="{worker.url}"}} 1.0' in metrics
        # It serves, so it is ready: Kubernetes keeps it in the Service.
        assert httpx.get(f"{gw.url}/health/ready").status_code == 200
    finally:
        gw.stop()
        _stop(sims, workers)


def test_total_outage_is_a_fast_503_with_retry_after(sims: SimThread, tmp_path: Path) -> None:
    workers = [sims.start(model="m", error_rate=1.0, error_status=500) for _ in range(2)]
    # Panic routing off (by default every worker ejected means route to them anyway).
    options = {**FAST, "eject_after_failures": 1, "eject_base_s": 60, "panic_threshold": None}
    gw = start_pool(workers, options, tmp_path)
    try:
        with httpx.Client(base_url=gw.url) as http:
            body = {"model": "m", "messages": CHAT}
            for _ in range(2):
                assert http.post("/v1/chat/completions", json=body).status_code == 502
            seen = [w.received_total for w in workers]
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                r = http.post("/v1/chat/completions", json=body)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            # The engine's own words for the client (no worker named), passed on as is.
            assert r.json()["error"]["message"] == (
                "The model `m` has no worker that can take the request now; try again shortly."
            )
            # No worker was touched: the answer came from the gateway's own state.
            assert [w.received_total for w in workers] == seen
            times.sort()
            print(f"total-outage 503 round trip: p50 {times[100] * 1e3:.2f} ms, "
                  f"p99 {times[197] * 1e3:.2f} ms")  # fmt: skip
            ready = http.get("/health/ready")
            assert ready.status_code == 503 and "retry-after" in ready.headers
    finally:
        gw.stop()
        _stop(sims, workers)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_model_leaves_ready_and_the_other_model_serving(
    sims: SimThread, tmp_path: Path
) -> None:
    good = sims.start(model="good", itl_ms=1)
    port = _closed_port()
    models: list[dict[str, Any]] = [
        {"name": "good", "engine": "openai", "endpoints": [good.url], "options": FAST},
        {
            "name": "dead",
            "engine": "openai",
            "endpoints": [f"http://127.0.0.1:{port}"],
            "options": {**FAST, "start_timeout_s": 0.3},
        },
    ]
    gw = start_gateway(models, tmp_path, start_retry_s=0.5)
    late: SimServer | None = None
    try:
        with httpx.Client(base_url=gw.url) as http:
            assert http.get("/health/live").status_code == 200
            assert http.get("/health/ready").status_code == 200
            health = http.get("/health")
            assert health.status_code == 503  # monitoring: not every model serves
            assert health.json()["models"]["good"]["ready"] is True
            assert health.json()["models"]["dead"]["state"] == "unavailable"
            assert "not started" in gw.gateway.served.statuses()["dead"].detail
            r = http.post("/v1/chat/completions", json={"model": "dead", "messages": CHAT})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
            r2 = client.chat.completions.create(model="good", messages=CHAT, max_tokens=2)
            assert r2.choices[0].message.content
        # The dead model's upstream appears: the background retry starts it.
        late = SimServer(model="dead")
        sims.call(late.start("127.0.0.1", port))
        with httpx.Client(base_url=gw.url) as http:
            for _ in range(200):
                if http.get("/health").json()["models"]["dead"]["ready"]:
                    break
                time.sleep(0.05)
            r = http.post(
                "/v1/chat/completions",
                json={"model": "dead", "messages": CHAT, "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
    finally:
        gw.stop()
        _stop(sims, [good] + ([late] if late is not None else []))


def test_ready_when_all_and_listed(sims: SimThread, tmp_path: Path) -> None:
    good = sims.start(model="good", itl_ms=1)
    models: list[dict[str, Any]] = [
        {"name": "good", "engine": "openai", "endpoints": [good.url], "options": FAST},
        {
            "name": "dead",
            "engine": "openai",
            "endpoints": [f"http://127.0.0.1:{_closed_port()}"],
            "options": {**FAST, "start_timeout_s": 0.2},
        },
    ]
    for rule, code in (("all", 503), ("good", 200), ("dead", 503), ("good,dead", 503)):
        gw = start_gateway(models, tmp_path, ready_when=rule, start_retry_s=60)
        try:
            assert httpx.get(f"{gw.url}/health/ready").status_code == code, rule
        finally:
            gw.stop()
    sims.call(good.stop())


def test_admission_queue_bounds_and_answers_503_with_retry_after(
    sims: SimThread, tmp_path: Path
) -> None:
    import concurrent.futures

    worker = sims.start(model="m", itl_ms=40, output_tokens=40)
    models: list[dict[str, Any]] = [
        {
            "name": "m",
            "engine": "openai",
            "endpoints": [worker.url],
            "options": FAST,
            "admission": {"max_concurrent": 2, "max_queue": 2, "retry_after_s": 2},
        },
    ]
    gw = start_gateway(models, tmp_path)
    try:
        body = {"model": "m", "messages": CHAT}

        def call(_: int) -> httpx.Response:
            return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)

        gate = gw.gateway.admission.gates["m"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            admitted = [pool.submit(call, i) for i in range(4)]
            for _ in range(500):  # 2 running, 2 queued
                if gate.active == 2 and len(gate.waiters) == 2:
                    break
                time.sleep(0.01)
            assert gate.active == 2 and len(gate.waiters) == 2
            refused = [call(i) for i in range(4)]  # beyond the queue: at once
            answers = [f.result() for f in admitted]
        assert [r.status_code for r in answers] == [200] * 4
        for r in refused:
            assert r.status_code == 503
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["code"] == "queue_full"
        assert worker.received_total == 4  # the refused never reached the worker
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'gateway_admission_rejected_total{model="m"} 4.0' in metrics
        assert 'gateway_admission_wait_seconds_count{model="m"} 4.0' in metrics
        assert gw.gateway.admission.gates["m"].active == 0
    finally:
        gw.stop()
        sims.call(worker.stop())


async def _hold(url: str, count: int) -> list[asyncio.StreamWriter]:
    """`count` streamed requests sent straight to a worker and left open (its first one
    runs, the rest queue behind it); closing the writers ends them."""
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps({"model": "m", "messages": CHAT, "stream": True, "max_tokens": 5})
    writers = []
    for _ in range(count):
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        writers.append(writer)
    return writers


async def _release(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()


def test_mixed_vllm_and_lmdeploy_pool_routes_by_queue_depth(
    sims: SimThread, tmp_path: Path
) -> None:
    """One model on a vLLM-named and an LMDeploy-named worker: each one's waiting queue,
    read from its own metric names, steers the `queue_depth` scorer away from it."""
    kinds = {
        k: sims.start(model="m", max_running=1, metrics_family=k) for k in ("vllm", "lmdeploy")
    }
    urls = {k: w.url for k, w in kinds.items()}
    gw = start_gateway(
        [{"name": "m", "engine": "openai", "endpoints": list(urls.values()),
          "routing": {"scorers": {"queue_depth": 1}}, "options": FAST}],
        tmp_path,
    )  # fmt: skip
    try:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
            for busy, idle in (("vllm", "lmdeploy"), ("lmdeploy", "vllm")):
                kinds[busy].reconfigure(ttft_ms=60_000)  # the first held request runs on
                writers = sims.call(_hold(urls[busy], 3))
                kinds[busy].reconfigure(ttft_ms=0)
                waiting = f'gateway_worker_waiting_requests{{model="m",worker="{urls[busy]}"}} 2.0'
                deadline = time.monotonic() + 20
                while waiting not in httpx.get(f"{gw.url}/metrics").text:
                    assert time.monotonic() < deadline, f"{busy}: queue never scraped"
                    time.sleep(0.05)
                before = {k: w.received_total for k, w in kinds.items()}
                for _ in range(8):
                    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=2)
                    assert r.choices[0].message.content
                after = {k: w.received_total for k, w in kinds.items()}
                assert after[idle] - before[idle] == 8 and after[busy] == before[busy]
                sims.call(_release(writers))
                deadline = time.monotonic() + 20
                while kinds[busy].running or kinds[busy].waiting:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
    finally:
        gw.stop()
        _stop(sims, list(kinds.values()))


def test_embeddings_take_the_same_admission_queue(tmp_path: Path) -> None:
    """An `admission:` block on an embedding model bounds its requests like a generate
    model's (one admission pass for every hot route): beyond the queue, 503 queue_full."""
    import concurrent.futures

    from aiohttp import web

    async def slow_embed(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response(
            {"object": "list", "model": "e",
             "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
             "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        )  # fmt: skip

    async def models_(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "e", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/embeddings", slow_embed)
    app.router.add_get("/v1/models", models_)
    app.router.add_get("/health", models_)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)
    port = free_port()

    async def up() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(up(), loop).result(30)
    url = f"http://127.0.0.1:{port}"
    try:
        gw = start_gateway(
            [{"name": "e", "engine": "openai", "task": "embed", "endpoints": [url],
              "options": FAST, "admission": {"max_concurrent": 1, "max_queue": 1}}],
            tmp_path,
        )  # fmt: skip
        try:
            gate = gw.gateway.admission.gates["e"]

            def call(_: int) -> httpx.Response:
                body = {"model": "e", "input": "hello"}
                return httpx.post(f"{gw.url}/v1/embeddings", json=body, timeout=30)

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                admitted = [pool.submit(call, i) for i in range(2)]
                for _ in range(500):  # 1 running, 1 queued
                    if gate.active == 1 and len(gate.waiters) == 1:
                        break
                    time.sleep(0.01)
                assert gate.active == 1 and len(gate.waiters) == 1
                refused = call(2)
                answers = [f.result() for f in admitted]
            assert [r.status_code for r in answers] == [200, 200]
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "queue_full"
            assert "retry-after" in refused.headers
            assert gate.active == 0
        finally:
            gw.stop()
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
