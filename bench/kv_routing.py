"""KV-cache-event routing (`kv_cache_hit`) against the other policies, and what it costs.

Two parts, each in one run:

1. **Routing quality** on 4 simulator workers in process (no gateway HTTP in front, so the
   numbers are the routing's effect), each with a bounded prefix cache (`simulator.costs`:
   evictions) publishing vLLM's KV-cache events (`simulator.kv_events`), TTFT = 2 ms +
   `--prefill-ms` per uncached prompt token. Workload: 16 shared system prompts, sessions
   arriving in an open loop (the same arrival times for every policy, so throughput is
   equal by construction), each a multi-turn chat whose turns run back to back (the
   prompt grows by the previous answer and a new user line). Policies:
   `kv_cache_hit: 2, least_outstanding: 1`, `prefix_affinity: 2, least_outstanding: 1`,
   `least_outstanding`. Reports TTFT mean / p99, the workers' own prefix-cache hit rate
   (hit tokens ÷ prompt tokens), requests per second, max/min requests per worker, and the
   engine's KV-event counters (batches, gaps, replays), and the prefill the workers modelled
   per request (uncached prompt tokens × `--prefill-ms`, from their own counters: the TTFT
   difference without the clock's noise) — with `--drop` a share of event
   batches is never sent, and the index must replay them.
2. **CPU per request** (`--cpu`): for prompts of 1k, 8k and 32k tokens, the gateway's added
   work: tokenization (the `words` tokenizer; `--hf PATH`: a real tokenizer and chat
   template too), the block keys (`kv_blocks`), and the routing decision (index lookup +
   the scorers + the pick, `Router.pick` over 4 endpoints whose index holds the prompt's
   blocks), each call timed alone: p50 / p99 in µs of the thread's CPU time.

    .venv/bin/python bench/kv_routing.py [--sessions 96] [--rate 12] [--drop 0.1]
    .venv/bin/python bench/kv_routing.py --cpu [--hf PATH]
    .venv/bin/python bench/kv_routing.py --dry-run        # a tiny run of both (CI smoke)

A benchmark, not a test: read the ratios between policies measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.routing import pct, request

if TYPE_CHECKING:
    from engines.upstream.engine import OpenAIEngine
    from simulator import SimServer

WORKERS = 4
MODEL = "bench-m"
POLICIES: list[tuple[str, dict[str, float]]] = [
    ("kv_cache_hit", {"kv_cache_hit": 2, "least_outstanding": 1}),
    ("prefix_affinity", {"prefix_affinity": 2, "least_outstanding": 1}),
    ("least_outstanding", {"least_outstanding": 1}),
]

Session = list[list[dict[str, str]]]


def sessions_for(
    rng: random.Random, n_sys: int, sys_words: int, sessions: int, turns: int, preamble: int = 0
) -> list[Session]:
    """Per session, the messages of each turn: one of `n_sys` system prompts (uniformly;
    `preamble` words common to all, then `sys_words` of their own), then per turn the
    previous turns with their replies and a new user line."""
    vocab = [f"w{i}" for i in range(5000)]
    common = [rng.choice(vocab) for _ in range(preamble)]
    systems = [
        " ".join(common + [rng.choice(vocab) for _ in range(sys_words)]) for _ in range(n_sys)
    ]
    out = []
    for _ in range(sessions):
        msgs = [{"role": "system", "content": rng.choice(systems)}]
        session: Session = []
        for t in range(turns):
            user = " ".join(rng.choice(vocab) for _ in range(24))
            msgs = [*msgs, {"role": "user", "content": f"turn {t}: {user}"}]
            session.append(msgs)
            reply = " ".join(rng.choice(vocab) for _ in range(24))
            msgs = [*msgs, {"role": "assistant", "content": reply}]
        out.append(session)
    return out


async def sim_fleet(cache_tokens: int, prefill_ms: float, drop: float = 0.0) -> list[SimServer]:
    from simulator import SimConfig, SimServer

    out = []
    for i in range(WORKERS):
        s = SimServer(
            SimConfig(
                model=MODEL,
                seed=i,
                ttft_ms=2,
                itl_ms=1,
                prefix_cache_tokens=cache_tokens,
                prefill_ms_per_token=prefill_ms,
                kv_events_port=0,
                kv_events_drop_rate=drop,
            )
        )
        await s.start()
        out.append(s)
    return out


def kv_spec(servers: list[SimServer], scorers: dict[str, float]) -> Any:
    """An attach-mode spec for `servers`, each naming its event source."""
    from engines.spec import ModelSpec

    sources = {}
    for s in servers:
        assert s.kv_events is not None
        sources[s.url] = {"endpoint": s.kv_events.endpoint, "replay": s.kv_events.replay_endpoint}
    return ModelSpec.model_validate(
        {
            "name": MODEL,
            "engine": "openai",
            "endpoints": [s.url for s in servers],
            "routing": {
                "scorers": scorers,
                "kv_events": {"tokenizer": "words", "sources": sources},
            },
            "options": {"health_interval_s": 0.5},
        }
    )


async def open_loop(
    engine: OpenAIEngine, sessions: list[Session], starts: list[float]
) -> tuple[list[float], float]:
    """Each session starts at its time (seconds from now); its turns run back to back.
    TTFT of every request, and the wall time until the last ended."""
    ttfts: list[float] = []
    t_start = time.perf_counter()

    async def run(session: Session, at: float) -> None:
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


async def quality(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from engines.upstream.engine import OpenAIEngine

    rng = random.Random(args.seed)
    sessions = sessions_for(rng, 16, args.system_words, args.sessions, args.turns, args.preamble)
    t, starts = 0.0, []
    for _ in sessions:
        t += rng.expovariate(args.rate)
        starts.append(t)
    print(
        f"\n## 16 system prompts ({args.preamble} words in common + {args.system_words} "
        f"words) × {args.sessions} sessions of "
        f"{args.turns} turns, arriving at {args.rate:g}/s (open loop), {WORKERS} workers, "
        f"prefix cache {args.cache_tokens} tokens each, prefill {args.prefill_ms} ms/token, "
        f"event batches dropped: {args.drop:.0%}"
    )
    print(
        "policy             TTFT mean ms  TTFT p99 ms  prefill ms/req  hit rate  req/s  max/min"
        "  per worker        kv events (batches/gaps/replayed/resyncs)"
    )
    results: dict[str, dict[str, Any]] = {}
    for name, scorers in POLICIES:
        servers = await sim_fleet(args.cache_tokens, args.prefill_ms, args.drop)
        engine = OpenAIEngine(kv_spec(servers, scorers))
        await engine.start()
        try:
            ttfts, wall = await open_loop(engine, sessions, starts)
            hit = sum(s.prefix_cache.hit_tokens for s in servers if s.prefix_cache)
            query = sum(s.prefix_cache.query_tokens for s in servers if s.prefix_cache)
            loads = [s.requests_total for s in servers]
            c = engine.status().counters
            mean, p99 = sum(ttfts) / len(ttfts), pct(ttfts, 0.99)
            rate, rps = hit / max(1, query), len(ttfts) / wall
            # The workers' own modelled prefill per request (their counters, no clock).
            prefill = (query - hit) * args.prefill_ms / len(ttfts)
            balance = max(loads) / max(1, min(loads))
            results[name] = {
                "ttft_mean": mean,
                "ttft_p99": p99,
                "hit_rate": rate,
                "prefill_ms": prefill,
                "rps": rps,
                "balance": balance,
                "loads": loads,
                "counters": c,
                "decisions": dict(engine.router.decisions),
            }
            kv = "/".join(
                str(int(c.get(k, 0)))
                for k in (
                    "kv_events_batches",
                    "kv_events_gaps",
                    "kv_events_replayed",
                    "kv_events_resyncs",
                )
            )
            print(
                f"{name:<17}  {mean * 1e3:12.2f}  {p99 * 1e3:11.2f}  {prefill:14.2f}  {rate:8.1%}"
                f"  {rps:5.0f}  {balance:7.2f}  {loads!s:<17} "
                + (kv if "kv_cache_hit" in scorers else "-")
            )
        finally:
            await engine.stop()
            for s in servers:
                await s.stop()
    return results


# ---------------------------------------------------------------------- CPU per request


def _cpu_us(f: Any, n: int) -> tuple[float, float]:
    """p50 / p99 of `f()` in µs of this thread's CPU time, each call timed alone."""
    xs = []
    for _ in range(3):
        f()
    for _ in range(n):
        t0 = time.thread_time_ns()
        f()
        xs.append((time.thread_time_ns() - t0) / 1e3)
    return pct(xs, 0.5), pct(xs, 0.99)


def _fresh_pick(scorer: Any, router: Any, eps: Any, request: Any) -> Any:
    scorer._picks.clear()
    return router.pick(eps, request)


def cpu(args: argparse.Namespace) -> None:
    import zmq.asyncio

    from engines.spec import RoutingSpec
    from engines.upstream.endpoints import Endpoint
    from engines.upstream.routing import SCORERS, Router, RoutingRequest
    from engines.upstream.routing.kv_cache_hit import KVCacheHitScorer
    from engines.upstream.routing.kv_events import EventSource, Subscriber
    from engines.upstream.routing.kv_index import BlockStored
    from engines.upstream.routing.kv_tokens import TOKENIZERS

    ctx = zmq.asyncio.Context()
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(5000)]
    print(
        f"\n## CPU per request (µs of thread CPU time, p50 / p99 of {args.cpu_n} calls each), "
        f"{WORKERS} endpoints, the prompt's blocks held by one of them"
    )
    print(
        "tokens  tokenizer  tokenize p50/p99    block keys p50/p99  decision p50/p99  "
        "decision (no hit) p50/p99"
    )
    kinds: list[tuple[str, str | None]] = [("words", None)]
    if args.hf:
        kinds.append(("hf", args.hf))
    for n_tokens in (1024, 8192, 32768):
        for kind, path in kinds:
            tok = TOKENIZERS[kind](path)
            if kind == "words":
                # One token per word.
                text = " ".join(rng.choice(vocab) for _ in range(n_tokens))
            else:
                # Words for n_tokens with the template: sized from a sample, then once more.
                words = n_tokens // 2
                for _ in range(3):
                    text = " ".join(rng.choice(vocab) for _ in range(words))
                    ids = tok.ids("chat", {"messages": [{"role": "user", "content": text}]})
                    assert ids is not None
                    if abs(len(ids) - n_tokens) <= n_tokens // 100:
                        break
                    words = max(1, round(words * n_tokens / len(ids)))
            body = {"messages": [{"role": "user", "content": text}]}
            spec = RoutingSpec.model_validate(
                {
                    "scorers": {"kv_cache_hit": 2, "least_outstanding": 1},
                    "kv_events": {"tokenizer": kind, "tokenizer_path": path},
                }
            )
            router = Router.from_spec(spec, SCORERS)
            scorer = next(s for s, _w in router.scorers if isinstance(s, KVCacheHitScorer))
            eps = [Endpoint.make(f"http://10.0.0.{i}:8000") for i in range(WORKERS)]
            for e in eps:
                e.healthy = True
            scorer._slots = {e: i for i, e in enumerate(eps)}
            scorer._tokenizer = tok
            # Every worker's events heard (never started: nothing is received here), so a
            # pick records its expectations as in a live fleet.
            for i in range(WORKERS):
                sub = Subscriber(ctx, EventSource("tcp://127.0.0.1:9"), print, print)
                sub.stats.batches = 1
                scorer._by_slot[i] = sub
            ids = tok.ids("chat", body)
            assert ids is not None
            keys = scorer.block_keys("chat", body, None)
            # Worker 1 holds the whole prompt (as its own events would say).
            scorer.index.apply(
                1,
                [BlockStored(list(range(len(keys))), None, ids.tolist()[: 16 * len(keys)], 16)],
            )
            assert scorer.index.match(keys, [0, 1, 2, 3]) == [0, len(keys), 0, 0]
            hit = RoutingRequest(blocks=keys)
            n = args.cpu_n
            # A miss is a new prompt each time (a pick makes its first blocks expected).
            misses = iter([RoutingRequest(blocks=[k ^ j for k in keys]) for j in range(1, n + 4)])
            hasher = scorer.index.hasher
            t50, t99 = _cpu_us(functools.partial(tok.ids, "chat", body), n)
            k50, k99 = _cpu_us(functools.partial(hasher.keys, ids), n)
            # (Its recent picks forgotten each time: else the share bound soon passes the
            # holder over, which is right for a fleet but not what this row measures.)
            d50, d99 = _cpu_us(functools.partial(_fresh_pick, scorer, router, eps, hit), n)
            m50, m99 = _cpu_us(lambda: router.pick(eps, next(misses)), n)  # noqa: B023
            scorer._picks.clear()
            assert router.pick(eps, hit) is eps[1]
            print(
                f"{len(ids):6d}  {kind:<9}  {t50:8.0f} / {t99:7.0f}  {k50:8.0f} / {k99:7.0f}"
                f"  {d50:6.0f} / {d99:7.0f}  {m50:8.0f} / {m99:7.0f}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=96)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rate", type=float, default=12.0, help="sessions started per second")
    p.add_argument("--system-words", type=int, default=256)
    p.add_argument("--preamble", type=int, default=0, help="words all system prompts share")
    p.add_argument("--cache-tokens", type=int, default=2048, help="prefix cache per worker")
    p.add_argument("--prefill-ms", type=float, default=0.2, help="per uncached token")
    p.add_argument("--drop", type=float, default=0.0, help="share of event batches lost")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cpu", action="store_true", help="only the CPU-per-request part")
    p.add_argument("--cpu-n", type=int, default=300)
    p.add_argument("--hf", default=None, help="a tokenizer directory for the hf tokenizer")
    p.add_argument("--dry-run", action="store_true", help="a tiny run of both parts")
    args = p.parse_args()
    if args.dry_run:
        args.sessions, args.turns, args.rate, args.cpu_n = 8, 2, 50.0, 5
    if not args.cpu or args.dry_run:
        asyncio.run(quality(args))
    if args.cpu or args.dry_run:
        cpu(args)


if __name__ == "__main__":
    main()
