"""Routing policies side by side on simulator workers with the cost model on, in one run.

Drives `engines.upstream.engine.OpenAIEngine` in process (no gateway HTTP in front, so the
numbers are the routing's effect, not the front door's) against 4 simulator workers on
loopback, each with its own prefix cache and adapter slots (`simulator.costs`):

1. shared prefix: 8 long system prompts (400 words each) × many users, each request a
   system prompt plus a short user turn; per worker a prefix cache of 4 prompts' worth,
   prefill 0.05 ms per uncached token. Policies: prefix-aware (`prefix_affinity: 2,
   least_outstanding: 1`), least-outstanding, round-robin. Reports TTFT p50/p99 (time to
   the first streamed bytes) and the prefix-cache hit rate (hit tokens ÷ prompt tokens,
   from the workers' own counters).
2. LoRA: 16 adapters (then 24: more than the 16 slots), 4 slots per worker, 50 ms per
   adapter load, requests naming an adapter uniformly at random; adapters registered
   through the admin API first (each placed on the least-loaded worker), then counted.
   Policies: `lora_affinity: 2, least_outstanding: 1` vs least-outstanding alone (both
   with on-demand placement). Reports the share of adapter
   requests that found their worker already holding the adapter, and adapter loads per
   1,000 requests.
3. Routing decision cost: `Router.pick` over 16 endpoints (random outstanding counts,
   random keys), each call timed alone, in wall time and in the thread's CPU time (which
   leaves out preemption by other processes on a shared machine); p50/p99 per policy.

    .venv/bin/python bench/routing.py [--requests 800] [--concurrency 8] [--pick-only]

A benchmark, not a test: read the ratios between policies measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.spec import RoutingSpec
from engines.upstream.endpoints import Endpoint
from engines.upstream.routing import SCORERS, Router, RoutingRequest
from engines.upstream.routing.hashring import stable_hash

if TYPE_CHECKING:
    from engines.base import GenerateRequest
    from engines.upstream.engine import OpenAIEngine
    from simulator import SimServer

WORKERS = 4
MODEL = "bench-m"


class Uniform:
    """Round-robin as a policy: every endpoint scores the same, so the picker's rotating
    tie-break decides."""

    name = "uniform"

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        return [1.0] * len(candidates)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def fleet(**cfg: Any) -> list[SimServer]:
    from simulator import SimConfig, SimServer

    out = []
    for i in range(WORKERS):
        s = SimServer(SimConfig(model=MODEL, seed=i, **cfg))
        await s.start()
        out.append(s)
    return out


async def engine_for(
    servers: list[SimServer],
    scorers: dict[str, float],
    lora: dict[str, Any] | None = None,
    load_factor: float = 1.25,
) -> OpenAIEngine:
    from engines.spec import ModelSpec
    from engines.upstream.engine import OpenAIEngine

    spec = ModelSpec(
        name=MODEL,
        engine="openai",
        endpoints=[s.url for s in servers],
        routing={"scorers": scorers, "load_factor": load_factor},
        lora=lora,
        options={"health_interval_s": 0.5},
    )
    e = OpenAIEngine(spec)
    await e.start()
    return e


def request(messages: list[dict[str, str]], adapter: str | None = None) -> GenerateRequest:
    from engines.base import GenerateRequest

    body = {
        "model": adapter or MODEL,
        "messages": messages,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return GenerateRequest("chat", body, adapter or MODEL, adapter, "bench", int(time.time()))


async def drive(engine: OpenAIEngine, reqs: list[GenerateRequest], concurrency: int) -> list[float]:
    """Run `reqs` with `concurrency` in flight; TTFT of each (seconds)."""
    ttfts: list[float] = []
    queue = list(reversed(reqs))

    async def worker() -> None:
        while queue:
            r = queue.pop()
            t0 = time.perf_counter()
            first = True
            async for _ in engine.stream(r):
                if first:
                    ttfts.append(time.perf_counter() - t0)
                    first = False

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts


async def shared_prefix(n: int, concurrency: int) -> None:
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    systems = [" ".join(rng.choice(vocab) for _ in range(400)) for _ in range(8)]
    reqs = [
        request(
            [
                {"role": "system", "content": systems[rng.randrange(8)]},
                {"role": "user", "content": f"user {rng.randrange(10**6)} asks something short"},
            ]
        )
        for _ in range(n)
    ]
    prefix = {"prefix_affinity": 2, "least_outstanding": 1}
    policies: list[tuple[str, dict[str, float] | None, float]] = [
        ("prefix-aware c=1.25", prefix, 1.25),
        ("prefix-aware c=2", prefix, 2.0),
        ("least-outstanding", {"least_outstanding": 1}, 1.25),
        ("round-robin", None, 1.25),
    ]
    print(f"\n## shared prefix: 8 system prompts × {n} requests, {concurrency} in flight")
    print("policy               TTFT p50 ms  TTFT p99 ms  cache hit rate  max/min worker load")
    for name, scorers, c in policies:
        servers = await fleet(
            ttft_ms=5, itl_ms=2, prefix_cache_tokens=4 * 420, prefill_ms_per_token=0.2
        )
        engine = await engine_for(servers, scorers or {"least_outstanding": 1}, load_factor=c)
        if scorers is None:
            engine.router = Router([(Uniform(), 1.0)])
        try:
            ttfts = await drive(engine, reqs, concurrency)
            hit = sum(s.prefix_cache.hit_tokens for s in servers if s.prefix_cache)
            query = sum(s.prefix_cache.query_tokens for s in servers if s.prefix_cache)
            loads = [s.requests_total for s in servers]
            print(
                f"{name:<19}  {pct(ttfts, 0.5) * 1e3:11.1f}  {pct(ttfts, 0.99) * 1e3:11.1f}"
                f"  {hit / query:14.1%}  {max(loads) / max(1, min(loads)):19.2f}"
            )
        finally:
            await engine.stop()
            for s in servers:
                await s.stop()


async def lora(n: int, concurrency: int, count: int) -> None:
    rng = random.Random(2)
    adapters = [f"ad{i}" for i in range(count)]
    picks = [rng.choice(adapters) for _ in range(n)]
    print(
        f"\n## LoRA: {count} adapters, 4 slots per worker × {WORKERS}, {n} requests, "
        f"{concurrency} in flight"
    )
    print("policy                     on holder  loads/1000 req  TTFT p50 ms  TTFT p99 ms")
    for name, scorers in (
        ("lora-affinity", {"lora_affinity": 2, "least_outstanding": 1}),
        ("least-outstanding", {"lora_affinity": 0, "least_outstanding": 1}),
    ):
        servers = await fleet(ttft_ms=5, itl_ms=2, max_loras=4, lora_load_ms=50)
        engine = await engine_for(servers, scorers, lora={"max_adapters": 4})
        try:
            for a in adapters:
                await engine.load_adapter(a, f"/adapters/{a}")
            st = engine.adapter_state
            st.hits = st.misses = st.loads = 0  # count the workload only
            msgs = [{"role": "user", "content": "hello there"}]
            ttfts = await drive(engine, [request(msgs, a) for a in picks], concurrency)
            share = st.hits / max(1, st.hits + st.misses)
            print(
                f"{name:<25}  {share:9.1%}  {st.loads * 1000 / n:14.1f}"
                f"  {pct(ttfts, 0.5) * 1e3:11.1f}  {pct(ttfts, 0.99) * 1e3:11.1f}"
            )
        finally:
            await engine.stop()
            for s in servers:
                await s.stop()


def decision_cost(calls: int) -> None:
    rng = random.Random(3)
    eps = [Endpoint.make(f"http://10.0.0.{i}:8000") for i in range(16)]
    for i, e in enumerate(eps):
        e.healthy = True
        e.adapters = {f"ad{(i * 4 + k) % 16}": None for k in range(4)}
        e.adapter_slots = 4
    print(f"\n## Router.pick over 16 endpoints, {calls} calls per policy")
    # Wall time includes being preempted by other processes; thread CPU time does not.
    print("policy                                  wall p50  wall p99   CPU p50   CPU p99 (µs)")
    policies = {
        "least_outstanding": {"least_outstanding": 1},
        "prefix_affinity + least_outstanding": {"prefix_affinity": 2, "least_outstanding": 1},
        "session_affinity + least_outstanding": {"session_affinity": 2, "least_outstanding": 1},
        "lora_affinity + least_outstanding": {"lora_affinity": 2, "least_outstanding": 1},
        "all six scorers": {
            "least_outstanding": 1,
            "queue_depth": 1,
            "kv_cache": 1,
            "prefix_affinity": 1,
            "session_affinity": 1,
            "lora_affinity": 1,
        },
    }
    keys = [stable_hash(f"k{i}") for i in range(64)]
    for name, scorers in policies.items():
        router = Router.from_spec(RoutingSpec(scorers=scorers), SCORERS)
        wall, cpu = [], []
        clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
        for _ in range(calls):
            for e in eps:
                e.outstanding = rng.randrange(8)
            req = RoutingRequest(
                adapter=f"ad{rng.randrange(16)}",
                prefix=rng.choice(keys),
                session=rng.choice(keys),
            )
            c0 = cpu_clock()
            t0 = clock()
            router.pick(eps, req)
            t1 = clock()
            cpu.append(cpu_clock() - c0)
            wall.append(t1 - t0)
        print(
            f"{name:<38}  {pct(wall, 0.5) / 1e3:8.1f}  {pct(wall, 0.99) / 1e3:8.1f}"
            f"  {pct(cpu, 0.5) / 1e3:8.1f}  {pct(cpu, 0.99) / 1e3:8.1f}"
        )


async def fast_fail(calls: int) -> None:
    """The engine's answer with every worker ejected: no I/O, a 503 with Retry-After."""
    from engines.base import EngineUnavailable

    servers = await fleet()
    engine = await engine_for(servers, {"least_outstanding": 1})
    try:
        for ep in engine._endpoints:
            engine.outliers.eject(ep, asyncio.get_running_loop().time() + 600)
        msgs = [{"role": "user", "content": "hi"}]
        r = request(msgs)
        r.body["stream"] = False
        times = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            try:
                await engine.complete(r)
            except EngineUnavailable:
                pass
            else:
                raise AssertionError("served with every worker ejected")
            times.append(time.perf_counter_ns() - t0)
        print(f"\n## total outage, in-process: {calls} calls, p50 "
              f"{pct(times, 0.5) / 1e3:.1f} µs, p99 {pct(times, 0.99) / 1e3:.1f} µs")  # fmt: skip
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--pick-only", action="store_true", help="only the Router.pick cost")
    args = ap.parse_args()
    if args.pick_only:
        decision_cost(args.calls)
        return
    await shared_prefix(args.requests, args.concurrency)
    await lora(args.requests, args.concurrency, 16)
    await lora(args.requests, args.concurrency, 24)
    decision_cost(args.calls)
    await fast_fail(2000)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
