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
3. Fresh layouts (`--layouts N`, only this section): prefix-aware (`prefix_affinity: 2,
   least_outstanding: 1`) against least-outstanding on N fresh deployments, each new
   simulator workers (new ports, so a new hash ring) and new system prompts: 16 system
   prompts × 256 sessions of 4 turns (each turn the whole conversation so far), sessions
   arriving in an open loop (the same arrival times for both policies, so throughput is
   equal by construction). Reports per layout and policy the mean and p99 TTFT, the
   workers' prefix-cache hit rate, requests/s and max/min requests per worker.
4. Routing decision cost: `Router.pick` over 16 endpoints (random outstanding counts,
   random keys), each call timed alone, in wall time and in the thread's CPU time (which
   leaves out preemption by other processes on a shared machine); p50/p99 per policy.

    .venv/bin/python bench/routing.py [--requests 800] [--concurrency 8] [--pick-only]
    .venv/bin/python bench/routing.py --layouts 20     # section 3 alone

A benchmark, not a test: read the ratios between policies measured in the same run.

Why one file of this size: one benchmark run as a script; its three sections share the
workload generator and the fleet of simulator workers.
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


def pct(xs: Sequence[float], p: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(p * len(ys)))]


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
    **options: Any,
) -> OpenAIEngine:
    from engines.spec import ModelSpec
    from engines.upstream.engine import OpenAIEngine

    spec = ModelSpec.model_validate(
        {
            "name": MODEL,
            "engine": "openai",
            "endpoints": [s.url for s in servers],
            "routing": {"scorers": scorers, "load_factor": load_factor},
            "lora": lora,
            "options": {"health_interval_s": 0.5, **options},
        }
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
    prefix = {"prefix_affinity": 2.0, "least_outstanding": 1.0}
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


def session_turns(
    rng: random.Random, vocab: list[str], systems: list[str], sessions: int, turns: int
) -> list[list[list[dict[str, str]]]]:
    """Per session, the messages of each turn: one of `systems` (uniformly), then per turn a
    fresh user line, the previous turns and their replies (a fixed-length stand-in for the
    answer: the prefix cache sees prompts only)."""
    out = []
    for _ in range(sessions):
        msgs = [{"role": "system", "content": rng.choice(systems)}]
        session: list[list[dict[str, str]]] = []
        for t in range(turns):
            user = " ".join(rng.choice(vocab) for _ in range(12))
            msgs = [*msgs, {"role": "user", "content": f"turn {t}: {user}"}]
            session.append(msgs)
            reply = " ".join(rng.choice(vocab) for _ in range(16))
            msgs = [*msgs, {"role": "assistant", "content": reply}]
        out.append(session)
    return out


async def open_loop(
    engine: OpenAIEngine, sessions: list[list[list[dict[str, str]]]], starts: list[float]
) -> tuple[list[float], float]:
    """Start each session at its time (seconds from now, an open loop: the same arrivals
    for every policy, so throughput is equal by construction); its turns run back to back.
    TTFT of every request, and the wall time until the last one ended."""
    ttfts: list[float] = []
    t_start = time.perf_counter()

    async def run(session: list[list[dict[str, str]]], at: float) -> None:
        await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
        for msgs in session:
            t0 = time.perf_counter()
            first = True
            async for _ in engine.stream(request(msgs)):
                if first:
                    ttfts.append(time.perf_counter() - t0)
                    first = False

    await asyncio.gather(*(run(s, at) for s, at in zip(sessions, starts, strict=True)))
    return ttfts, time.perf_counter() - t_start


async def layouts(args: argparse.Namespace) -> None:
    """Prefix-aware against least-outstanding over `--layouts` fresh deployments: each one
    new simulator workers (new ports, so a new hash ring) and new system prompts."""
    n_sys, n_sess, turns = args.prompts, args.sessions, 4
    policies: list[tuple[str, dict[str, float]]] = [
        ("prefix-aware", {"prefix_affinity": 2, "least_outstanding": 1}),
        ("least-outstanding", {"least_outstanding": 1}),
    ]
    print(
        f"\n## {args.layouts} fresh layouts: {n_sys} system prompts ({args.system_words} words)"
        f" × {n_sess} sessions of {turns} turns, sessions arriving at {args.rate:g}/s"
        f" (open loop), {WORKERS} workers"
    )
    print(
        "layout  policy              TTFT mean ms  TTFT p99 ms  model ms  hit rate   req/s"
        "  max/min  per worker"
    )
    summary: dict[str, list[tuple[float, float, float, float, float]]] = {
        n: [] for n, _ in policies
    }
    for k in range(args.layouts):
        rng = random.Random(1000 + k)
        vocab = [f"w{i}" for i in range(5000)]
        systems = [
            " ".join(rng.choice(vocab) for _ in range(args.system_words)) for _ in range(n_sys)
        ]
        sessions = session_turns(rng, vocab, systems, n_sess, turns)
        t, starts = 0.0, []
        for _ in range(n_sess):
            t += rng.expovariate(args.rate)
            starts.append(t)
        for name, scorers in policies:
            servers = await fleet(
                ttft_ms=2,
                itl_ms=1,
                max_running=args.max_running,
                prefix_cache_tokens=args.cache_tokens,
                prefill_ms_per_token=args.prefill_ms,
            )
            engine = await engine_for(servers, scorers)
            try:
                ttfts, wall = await open_loop(engine, sessions, starts)
                hit = sum(s.prefix_cache.hit_tokens for s in servers if s.prefix_cache)
                query = sum(s.prefix_cache.query_tokens for s in servers if s.prefix_cache)
                loads = [s.requests_total for s in servers]
                ratio = max(loads) / max(1, min(loads))
                mean = sum(ttfts) / len(ttfts)
                # The workers' own TTFT model without queueing or this machine's noise:
                # ttft_ms + prefill_ms × uncached prompt tokens, per request.
                model = (2 + args.prefill_ms * (query - hit) / len(ttfts)) / 1e3
                summary[name].append((mean, hit / query, ratio, len(ttfts) / wall, model))
                print(
                    f"{k:6d}  {name:<18}  {mean * 1e3:12.2f}  {pct(ttfts, 0.99) * 1e3:11.2f}"
                    f"  {model * 1e3:8.2f}  {hit / query:8.1%}  {len(ttfts) / wall:6.0f}"
                    f"  {ratio:7.2f}  {loads}"
                )
            finally:
                await engine.stop()
                for s in servers:
                    await s.stop()
    print(
        "\npolicy              TTFT mean ms (mean of layouts)  model ms  hit rate  req/s"
        "  max/min: worst, median"
    )
    for name, rows in summary.items():
        ratios = sorted(r[2] for r in rows)
        n = len(rows)
        print(
            f"{name:<18}  {sum(r[0] for r in rows) / n * 1e3:30.2f}"
            f"  {sum(r[4] for r in rows) / n * 1e3:8.2f}  {sum(r[1] for r in rows) / n:8.1%}"
            f"  {sum(r[3] for r in rows) / n:5.0f}"
            f"  {ratios[-1]:.2f}, {ratios[n // 2]:.2f}"
        )


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
        ("lora-affinity", {"lora_affinity": 2.0, "least_outstanding": 1.0}),
        ("least-outstanding", {"lora_affinity": 0.0, "least_outstanding": 1.0}),
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
    policies: dict[str, dict[str, float]] = {
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
    # panic_threshold null: the fast-fail, not panic routing to the ejected workers.
    engine = await engine_for(servers, {"least_outstanding": 1}, panic_threshold=None)
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
    ap.add_argument("--layouts", type=int, default=0, help="only the fresh-layouts section")
    ap.add_argument("--prompts", type=int, default=16, help="system prompts (--layouts)")
    ap.add_argument("--sessions", type=int, default=256, help="sessions per layout")
    ap.add_argument("--system-words", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50.0, help="sessions started per second")
    ap.add_argument("--max-running", type=int, default=4, help="per worker; more queue")
    ap.add_argument("--cache-tokens", type=int, default=1000, help="prefix cache per worker")
    ap.add_argument("--prefill-ms", type=float, default=0.2, help="per uncached token")
    args = ap.parse_args()
    if args.pick_only:
        decision_cost(args.calls)
        return
    if args.layouts:
        await layouts(args)
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
