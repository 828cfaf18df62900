"""KV-cache-event routing (`kv_cache_hit`): vLLM's event wire in both layouts, the index,
the gateway's tokenizer against the simulator's tokens, and live simulator workers
publishing events — the prefix's holder is picked, a lost batch is replayed, a lost batch
nobody can replay or a restarted worker is forgotten and relearned, a worker that publishes
nothing leaves routing to load, and `gateway check` refuses the scorer without a source."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from engines.base import GenerateRequest
from engines.spec import ModelSpec
from engines.upstream.engine import OpenAIEngine
from engines.upstream.routing.kv_blocks import BlockHasher, extra_seed
from engines.upstream.routing.kv_events import decode_batch
from engines.upstream.routing.kv_index import BlockRemoved, BlockStored, Cleared, KVIndex
from engines.upstream.routing.kv_tokens import WordTokens
from simulator import SimConfig, SimServer
from simulator.costs import prompt_words, token_ids

MODEL = "sim-kv"
SYSTEM = " ".join(f"s{i}" for i in range(63))  # with a first word, 64 tokens: 4 blocks


# ---------------------------------------------------------------- the wire and the index


def test_both_event_layouts_decode_alike() -> None:
    stored = {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": "ad",
        "extra_keys": [["ad", "salt"], ["ad"]],
    }
    as_map = msgspec.msgpack.encode(
        {
            "ts": 1.0,
            "events": [
                stored,
                {"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
            ],
            "data_parallel_rank": 0,
        }
    )
    # array_like=True releases: [ts, events], each event [tag, fields in order].
    as_array = msgspec.msgpack.encode(
        [
            1.0,
            [
                [
                    "BlockStored",
                    [11, 12],
                    None,
                    list(range(32)),
                    16,
                    None,
                    "GPU",
                    "ad",
                    [["ad", "salt"], ["ad"]],
                ],
                ["BlockRemoved", [12], "GPU"],
                ["AllBlocksCleared"],
            ],
        ]
    )
    a, b = decode_batch(as_map), decode_batch(as_array)
    assert a == b
    assert a[0] == BlockStored([11, 12], None, list(range(32)), 16, "ad", [("ad", "salt"), ("ad",)])
    assert a[1] == BlockRemoved([12]) and isinstance(a[2], Cleared)


def test_index_keys_blocks_as_the_request_does_and_follows_removals() -> None:
    idx = KVIndex()
    tokens = list(range(100, 164))  # 4 blocks
    seed = extra_seed(("ad", "salt"))
    keys = idx.hasher.keys(tokens, seed)
    # Worker 0 stores the first two blocks, then the next two chained on its own hash 2.
    idx.apply(0, [BlockStored([1, 2], None, tokens[:32], 16, "ad", [("ad", "salt"), ("ad",)])])
    idx.apply(0, [BlockStored([3, 4], 2, tokens[32:], 16, "ad", [("ad",), ("ad",)])])
    idx.apply(1, [BlockStored([9], None, tokens[:16], 16, "ad", [("ad", "salt")])])
    assert idx.match(keys, [0, 1, 2]) == [4, 1, 0]
    # The same tokens without the salt, or under another adapter, are other blocks.
    assert idx.match(idx.hasher.keys(tokens, extra_seed(("ad",))), [0, 1]) == [0, 0]
    idx.apply(0, [BlockRemoved([3])])
    assert idx.match(keys, [0, 1]) == [2, 1]  # only leading blocks count
    # A store whose parent the index never saw cannot be keyed: an orphan.
    idx.apply(1, [BlockStored([7], 555, tokens[16:32], 16, "ad", [("ad",)])])
    assert idx.orphans == 1 and idx.match(keys, [1]) == [1]
    idx.apply(0, [Cleared()])
    assert idx.match(keys, [0, 1]) == [0, 1] and idx.size(0) == 0
    assert idx.nbytes() > 0


def test_index_memory_is_bounded_per_worker() -> None:
    idx = KVIndex(max_blocks=1024)
    parent = None
    for i in range(70):  # 70 × 16 blocks > 1024: the worker is cleared once
        hashes = list(range(i * 16, i * 16 + 16))
        idx.apply(0, [BlockStored(hashes, parent, list(range(256)), 16)])
        parent = hashes[-1]
    assert idx.overflows == 1 and idx.size(0) < 1024


async def test_words_tokenizer_is_what_the_simulator_tokenizes() -> None:
    """One rule, held over the wire: the gateway's `words` tokenizer gives the ids the
    simulator's own `POST /tokenize` answers, and its prefix cache keys blocks on them."""
    bodies: list[tuple[str, dict[str, Any]]] = [
        (
            "chat",
            {
                "messages": [
                    {"role": "system", "content": "You  are\nterse."},
                    {"role": "user", "content": [{"type": "text", "text": "hi  there"}]},
                ]
            },
        ),
        ("completions", {"prompt": "a b  c"}),
    ]
    server = SimServer(SimConfig(model=MODEL))
    await server.start()
    tok = WordTokens()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            for route, body in bodies:
                r = await client.post("/tokenize", json={"model": MODEL, **body})
                assert r.status_code == 200, r.text
                ids = tok.ids(route, body)
                assert ids is not None and ids.tolist() == r.json()["tokens"]
                words = prompt_words(body["messages"] if route == "chat" else body["prompt"])
                assert token_ids(words) == r.json()["tokens"]
    finally:
        await server.stop()


def test_block_keys_vectorised_equal_the_chain() -> None:
    h = BlockHasher(16)
    tokens = [(i * 7919) % 50000 for i in range(16 * 40 + 5)]
    key = seed = extra_seed(("x",))
    chain = []
    for c in h.contents(tokens).tolist():
        key = h.step(key, c)
        chain.append(key)
    assert h.keys(tokens, seed) == chain and len(chain) == 40


# ---------------------------------------------------------------- live: simulator workers


async def fleet(n: int, **cfg: Any) -> list[SimServer]:
    out = []
    for i in range(n):
        s = SimServer(
            SimConfig(model=MODEL, seed=i, prefix_cache_tokens=4096, kv_events_port=0, **cfg)
        )
        await s.start()
        out.append(s)
    return out


def spec_for(
    servers: list[SimServer],
    replay: bool = True,
    sources: dict[str, Any] | None = None,
    **routing: Any,
) -> ModelSpec:
    sources = dict(sources or {})
    for s in servers:
        if s.kv_events is not None:
            src = {"endpoint": s.kv_events.endpoint}
            if replay:
                src["replay"] = s.kv_events.replay_endpoint
            sources[s.url] = src
    return ModelSpec(
        name=MODEL,
        engine="openai",
        endpoints=[s.url for s in servers],
        routing={
            "scorers": {"kv_cache_hit": 2, "least_outstanding": 1},
            "kv_events": {"tokenizer": "words", "sources": sources},
            **routing,
        },
        options={"health_interval_s": 0.2},
    )


def chat(system: str, user: str, **body: Any) -> GenerateRequest:
    b = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 2,
        **body,
    }
    return GenerateRequest("chat", b, MODEL, None, "t", int(time.time()))


async def where(engine: OpenAIEngine, servers: list[SimServer], req: GenerateRequest) -> int:
    before = [s.requests_total for s in servers]
    await engine.complete(req)
    return next(i for i, s in enumerate(servers) if s.requests_total > before[i])


async def until(cond: Any, within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


def counters(engine: OpenAIEngine) -> dict[str, float]:
    return engine.status().counters


async def test_requests_go_to_the_worker_holding_their_prefix() -> None:
    servers = await fleet(4)
    engine = OpenAIEngine(spec_for(servers))
    await engine.start()
    try:
        homes = {}
        for k in range(4):
            system = f"topic{k} {SYSTEM}"
            homes[k] = await where(engine, servers, chat(system, "first"))
            await until(lambda k=k: counters(engine)["kv_events_batches"] >= k + 1)
        # An idle fleet places new prefixes evenly; each later request finds its holder.
        assert sorted(homes.values()) == [0, 1, 2, 3]
        for k in range(4):
            for u in range(3):
                got = await where(engine, servers, chat(f"topic{k} {SYSTEM}", f"q{u}"))
                assert got == homes[k]
        assert engine.router.decisions["kv_cache_hit"] == 12
        # The salt is a different cache: that request is placed by load, not by the hit.
        await where(engine, servers, chat(f"topic0 {SYSTEM}", "q", cache_salt="tenant-b"))
        assert engine.router.decisions["kv_cache_hit"] == 12
        hit = sum(s.prefix_cache.hit_tokens for s in servers if s.prefix_cache)
        assert hit >= 12 * 64
        c = counters(engine)
        assert c["kv_index_blocks"] > 0 and c["kv_index_bytes"] > 0 and c["kv_events_gaps"] == 0
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


def keys_of(engine: OpenAIEngine, req: GenerateRequest) -> list[int]:
    assert engine._kv is not None
    return engine._kv.block_keys("chat", req.body, None)


def held(engine: OpenAIEngine, req: GenerateRequest) -> list[int]:
    """Leading blocks of `req` the index says each worker holds."""
    assert engine._kv is not None
    return engine._kv.index.match(keys_of(engine, req), [0, 1])


async def warm_both(engine: OpenAIEngine, servers: list[SimServer]) -> list[GenerateRequest]:
    """One prefix per worker (an idle fleet places new prefixes evenly), its events in."""
    reqs = [chat(f"warm{k} {SYSTEM}", "w") for k in range(2)]
    assert sorted([await where(engine, servers, r) for r in reqs]) == [0, 1]
    await until(lambda: counters(engine)["kv_events_batches"] >= 2)
    return reqs


async def test_a_lost_batch_is_replayed() -> None:
    servers = await fleet(2)
    engine = OpenAIEngine(spec_for(servers))
    await engine.start()
    try:
        await warm_both(engine, servers)
        for s in servers:
            s.reconfigure(kv_events_drop_rate=1.0)
        # This prefix's store is lost on the wire: the index has not heard of it.
        lost = chat(f"lost {SYSTEM}", "a")
        placed = await where(engine, servers, lost)
        await asyncio.sleep(0.2)
        # Expected where it was sent, but no event has confirmed it.
        assert engine._kv is not None
        worker = engine._kv.index._workers[placed]
        keys = keys_of(engine, lost)
        assert set(keys) <= set(worker.pending) and not set(keys) & set(worker.blocks.values())
        for s in servers:
            s.reconfigure(kv_events_drop_rate=0.0)
        # The worker's next batch shows the gap; the replay socket fills it. (New prefixes
        # until one lands on that worker: four could all go to the other one.)
        landed = [await where(engine, servers, chat(f"later{k} {SYSTEM}", "b")) for k in range(4)]
        k = 4
        while placed not in landed and k < 64:
            landed.append(await where(engine, servers, chat(f"later{k} {SYSTEM}", "b")))
            k += 1
        await until(lambda: counters(engine)["kv_events_replayed"] >= 1)
        c = counters(engine)
        assert c["kv_events_gaps"] == 1 and c["kv_events_resyncs"] == 0
        ev = servers[placed].kv_events
        assert ev is not None and ev.dropped == 1 and ev.replays >= 1
        assert held(engine, lost)[placed] == 4
        assert set(keys) <= set(worker.blocks.values()) and not set(keys) & set(worker.pending)
        # The replayed store counts: the lost prefix goes to its holder.
        assert await where(engine, servers, chat(f"lost {SYSTEM}", "c")) == placed
        assert engine.router.decisions["kv_cache_hit"] >= 1
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


async def test_an_unreplayable_gap_and_a_restart_are_forgotten_and_relearned() -> None:
    servers = await fleet(2)
    engine = OpenAIEngine(spec_for(servers, replay=False))
    await engine.start()
    # Without a replay socket nothing fetches what a SUB socket misses while it joins
    # (ZeroMQ's slow joiner): let the subscriptions reach the publishers first.
    await asyncio.sleep(0.3)
    try:
        warm = await warm_both(engine, servers)
        assert [max(held(engine, r)) for r in warm] == [4, 4]
        for s in servers:
            s.reconfigure(kv_events_drop_rate=1.0)
        placed = await where(engine, servers, chat(f"lost {SYSTEM}", "a"))
        for s in servers:
            s.reconfigure(kv_events_drop_rate=0.0)
        for k in range(4):
            await where(engine, servers, chat(f"later{k} {SYSTEM}", "b"))
        # No replay endpoint: the worker's entries cannot be trusted and are dropped.
        await until(lambda: counters(engine)["kv_events_resyncs"] >= 1)
        assert counters(engine)["kv_events_replayed"] == 0
        gone = next(r for r in warm if held(engine, r)[placed] == 0)
        assert gone is not None
        # Relearned from the next events: a fresh prefix is indexed and found again.
        fresh = chat(f"fresh {SYSTEM}", "1")
        home = await where(engine, servers, fresh)
        await until(lambda: held(engine, fresh)[home] == 4)
        assert await where(engine, servers, chat(f"fresh {SYSTEM}", "2")) == home

        # A restarted worker (same ports, empty cache, sequence numbers from 0 again).
        old = servers[home]
        assert old.kv_events is not None
        port, ev_port = int(old.url.rsplit(":", 1)[1]), old.kv_events.port
        replay_port = old.kv_events.replay_port
        await old.stop()
        new = SimServer(SimConfig(model=MODEL, prefix_cache_tokens=4096, kv_events_port=ev_port))
        assert new.kv_events is not None
        new.kv_events.replay_port = replay_port  # its old ports, both
        await new.start("127.0.0.1", port)
        servers[home] = new
        await until(lambda: all(ep.healthy for ep in engine._endpoints), 15.0)
        await asyncio.sleep(0.3)  # the subscriber reconnects
        assert held(engine, fresh)[home] == 4  # nothing has said otherwise yet
        for k in range(6):
            await where(engine, servers, chat(f"after{k} {SYSTEM}", "r"))
        # Its first batch (seq 0 again) says it restarted: its old blocks are forgotten.
        await until(lambda: counters(engine)["kv_events_restarts"] >= 1)
        assert held(engine, fresh)[home] == 0
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


async def test_a_worker_that_publishes_nothing_leaves_routing_to_load() -> None:
    servers = [SimServer(SimConfig(model=MODEL, seed=i)) for i in range(2)]
    for s in servers:
        await s.start()
    # Each names a source where nothing publishes (a worker without events turned on).
    silent = {s.url: {"endpoint": f"tcp://127.0.0.1:{1 + i}"} for i, s in enumerate(servers)}
    sp = spec_for(servers, sources=silent)
    engine = OpenAIEngine(sp)
    await engine.start()
    try:
        picks = [await where(engine, servers, chat(SYSTEM, f"u{i}")) for i in range(8)]
        assert sorted(set(picks)) == [0, 1]  # no hits anywhere: spread by load
        assert "kv_cache_hit" not in engine.router.decisions
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


# ---------------------------------------------------------------- configuration


def test_check_refuses_the_scorer_without_an_event_source() -> None:
    sp = ModelSpec(
        name="m",
        engine="openai",
        endpoints=["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        routing={
            "scorers": {"kv_cache_hit": 2, "least_outstanding": 1},
            "kv_events": {
                "tokenizer": "words",
                "sources": {"http://10.0.0.1:8000": {"endpoint": "tcp://10.0.0.1:5557"}},
            },
        },
    )
    issues = OpenAIEngine.check_spec(sp)
    assert [(i.path, "endpoints[1]" in i.message) for i in issues] == [
        ("routing.kv_events.sources", True)
    ]
    from engines.sim import SimEngine

    sim = ModelSpec(name="m", engine="sim", routing={"scorers": {"kv_cache_hit": 1}}, options={})
    assert [i.path for i in SimEngine.check_spec(sim)] == ["options.kv_events_port"]
    ok = sim.model_copy(update={"options": {"prefix_cache_tokens": 4096}})
    assert SimEngine.check_spec(ok) == []


@pytest.mark.parametrize("engine", ["lmdeploy"])
def test_engines_without_events_refuse_the_scorer(engine: str) -> None:
    from engines import engine_class

    sp = ModelSpec(
        name="m",
        engine=engine,
        model="/models/x",
        routing={"scorers": {"kv_cache_hit": 1}},
    )
    paths = [i.path for i in engine_class(engine).check_spec(sp)]
    assert "routing.scorers.kv_cache_hit" in paths


def test_launched_vllm_replicas_publish_events_on_a_port_pair_each() -> None:
    from engines.launch.vllm import VLLMEngine

    sp = ModelSpec(
        name="m",
        engine="vllm",
        model="/models/x",
        replicas=2,
        routing={
            "scorers": {"kv_cache_hit": 2, "least_outstanding": 1},
            "kv_events": {"base_port": 6000},
        },
    )
    assert VLLMEngine.check_spec(sp) == []
    cmds = VLLMEngine.worker_commands(sp)
    cfgs = [c.argv[c.argv.index("--kv-events-config") + 1] for c in cmds]
    assert [msgspec.json.decode(c) for c in cfgs] == [
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{p}",
            "replay_endpoint": f"tcp://*:{p + 1}",
            "topic": "kv-events",
        }
        for p in (6000, 6002)
    ]
    sources = VLLMEngine(sp).kv_event_sources([c.url for c in cmds])
    assert [(s.endpoint, s.replay) for s in sources if s is not None] == [
        ("tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001"),
        ("tcp://127.0.0.1:6002", "tcp://127.0.0.1:6003"),
    ]
    plain = sp.model_copy(
        update={"routing": sp.routing.model_copy(update={"scorers": {"least_outstanding": 1.0}})}
    )
    assert all("--kv-events-config" not in c.argv for c in VLLMEngine.worker_commands(plain))


# ---------------------------------------------------------------- the bar, on simulators


def conversations(
    seed: int, sessions: int, turns: int, preamble: int = 0
) -> list[list[GenerateRequest]]:
    """16 shared system prompts (`preamble` words common to all, then 96 of their own),
    multi-turn sessions over them."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    common = [rng.choice(vocab) for _ in range(preamble)]
    systems = [" ".join(common + [rng.choice(vocab) for _ in range(96)]) for _ in range(16)]
    out = []
    for _ in range(sessions):
        msgs = [{"role": "system", "content": rng.choice(systems)}]
        turns_: list[GenerateRequest] = []
        for t in range(turns):
            user = " ".join(rng.choice(vocab) for _ in range(20))
            msgs = [*msgs, {"role": "user", "content": f"turn {t} {user}"}]
            body = {"model": MODEL, "messages": msgs, "max_tokens": 2}
            turns_.append(GenerateRequest("chat", body, MODEL, None, "t", 0))
            msgs = [
                *msgs,
                {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(20))},
            ]
        out.append(turns_)
    return out


async def run_policy(
    scorers: dict[str, float], work: list[list[GenerateRequest]], drop: float = 0.0
) -> dict[str, Any]:
    """The workload on 4 fresh simulators (1,024-token prefix caches: evictions), 4 sessions
    at a time, each session's turns in order. The workers' own counters: requests, prompt
    tokens, cached tokens, evicted blocks."""
    servers = await fleet(4, kv_events_drop_rate=drop)
    for s in servers:
        assert s.prefix_cache is not None
        s.prefix_cache.capacity = 1024 // 16
    sources = {
        s.url: {"endpoint": s.kv_events.endpoint, "replay": s.kv_events.replay_endpoint}
        for s in servers
        if s.kv_events is not None
    }
    engine = OpenAIEngine(
        ModelSpec(
            name=MODEL,
            engine="openai",
            endpoints=[s.url for s in servers],
            routing={"scorers": scorers, "kv_events": {"tokenizer": "words", "sources": sources}},
            options={"health_interval_s": 0.5},
        )
    )
    await engine.start()
    gate = asyncio.Semaphore(4)
    try:

        async def session(turns: list[GenerateRequest]) -> None:
            async with gate:
                for r in turns:
                    await engine.complete(r)
                    await asyncio.sleep(0.005)  # let the worker's events in

        await asyncio.gather(*(session(t) for t in work))
        caches = [s.prefix_cache for s in servers if s.prefix_cache is not None]
        loads = [s.requests_total for s in servers]
        return {
            "requests": sum(loads),
            "balance": max(loads) / max(1, min(loads)),
            "hit": sum(c.hit_tokens for c in caches) / sum(c.query_tokens for c in caches),
            "uncached": sum(c.query_tokens - c.hit_tokens for c in caches),
            "full": all(len(c.blocks) == c.capacity for c in caches),
            "counters": counters(engine),
        }
    finally:
        await engine.stop()
        for s in servers:
            await s.stop()


@pytest.mark.parametrize("drop", [0.0, 0.1])
async def test_kv_cache_hit_beats_prefix_affinity_on_shared_prefixes_with_evictions(
    drop: float,
) -> None:
    """The issue's bar on simulator workers: more of the prompt found in the workers' own
    prefix caches, so less prefill (the simulator's TTFT grows with uncached tokens), for
    the same requests, with max/min requests per worker ≤ 1.3; with 10 % of the event
    batches lost on the wire, the index replays them and keeps the lead. The 16 system
    prompts share a 100-word preamble (as apps built on one template do), longer than the
    512 characters `prefix_affinity` keys on: the ring sees one prefix, the index every
    block. (With unrelated system prompts the lead is smaller and layout-dependent:
    bench/kv_routing.py, docs/benchmarks.md.)"""
    work = conversations(13, sessions=64, turns=3, preamble=100)
    kv = await run_policy({"kv_cache_hit": 2, "least_outstanding": 1}, work, drop)
    pa = await run_policy({"prefix_affinity": 2, "least_outstanding": 1}, work, drop)
    assert kv["requests"] == pa["requests"] == 64 * 3
    assert kv["full"] and pa["full"]  # every cache filled up: evictions happened
    assert kv["hit"] > pa["hit"]
    assert kv["uncached"] < pa["uncached"]
    assert kv["balance"] <= 1.3
    c = kv["counters"]
    assert c["kv_index_blocks"] > 0 and c["kv_events_resyncs"] == 0
    if drop:
        assert c["kv_events_gaps"] > 0 and c["kv_events_replayed"] >= c["kv_events_gaps"]


def test_the_benchmark_runs_dry() -> None:
    """bench/kv_routing.py --dry-run: both parts, tiny (the benchmark is code too)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    p = subprocess.run(
        [sys.executable, str(root / "bench" / "kv_routing.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line.split()[0] for line in p.stdout.splitlines() if line[:1].isalpha()]
    assert {"kv_cache_hit", "prefix_affinity", "least_outstanding"} <= set(rows)
    assert " 32768  words " in p.stdout


def test_through_the_gateway_a_sim_fleet_routes_on_its_events(tmp_path: Path) -> None:
    """models.yaml's way: `engine: sim` with `kv_cache_hit` starts its servers publishing;
    clients with the openai SDK; the decisions and the index's counters on /metrics."""
    import openai

    from tests.conftest import start_gateway

    gw = start_gateway(
        [
            {
                "name": MODEL,
                "engine": "sim",
                "replicas": 3,
                "routing": {"scorers": {"kv_cache_hit": 2, "least_outstanding": 1}},
                "options": {"prefix_cache_tokens": 8192, "health_interval_s": 0.2},
            }
        ],
        tmp_path,
    )
    try:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
            for k in range(3):
                for u in range(4):
                    client.chat.completions.create(
                        model=MODEL,
                        messages=[
                            {"role": "system", "content": f"topic{k} {SYSTEM}"},
                            {"role": "user", "content": f"question {u}"},
                        ],
                        max_tokens=2,
                    )
                    time.sleep(0.05)  # the worker's events reach the index
        metrics = httpx.get(f"{gw.url}/metrics").text
        hits = [
            line
            for line in metrics.splitlines()
            if line.startswith("gateway_routing_decisions_total")
            and 'reason="kv_cache_hit"' in line
        ]
        assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 8  # 3 × 3 repeats, ±1 in flight
        batches = [line for line in metrics.splitlines() if 'event="kv_events_batches"' in line]
        assert batches and float(batches[0].rsplit(" ", 1)[1]) >= 3
    finally:
        gw.stop()


async def test_hf_tokenizer_renders_the_chat_template_and_long_prompts_go_to_a_thread(
    tmp_path: Path,
) -> None:
    """The `hf` tokenizer as vLLM's server tokenizes: chat through the model's template with
    the generation prompt and no special tokens added, a completions prompt with them (a
    tiny word-level tokenizer written here, so no hub is needed); a prompt above
    `thread_above_chars` is keyed in the tokenizer thread, to the same keys."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engines.spec import RoutingSpec
    from engines.upstream.routing import SCORERS, Router
    from engines.upstream.routing.base import RoutingRequest
    from engines.upstream.routing.kv_cache_hit import KVCacheHitScorer

    vocab = {"[UNK]": 0, "<s>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    for w in ["system", "user", "assistant", *(f"s{i}" for i in range(63)), "topic0", "hi"]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    fast.save_pretrained(tmp_path / "tok")
    spec = RoutingSpec.model_validate(
        {
            "scorers": {"kv_cache_hit": 1},
            "kv_events": {"tokenizer_path": str(tmp_path / "tok"), "thread_above_chars": 100},
        }
    )
    scorer = next(
        s for s, _w in Router.from_spec(spec, SCORERS).scorers if isinstance(s, KVCacheHitScorer)
    )
    await scorer.start([], [], None)
    try:
        tok = scorer._tokenizer
        assert tok is not None
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        ids = tok.ids("chat", chat)
        assert ids is not None and ids.tolist() == [2, vocab["user"], vocab["hi"], 3, 2, 6]
        done = tok.ids("completions", {"prompt": "hi hi"})
        assert done is not None and done.tolist()[-2:] == [vocab["hi"]] * 2
        long_body = {"messages": [{"role": "system", "content": f"topic0 {SYSTEM}"}]}
        keys = scorer.block_keys("chat", long_body, "ad")
        assert len(keys) == 4  # 69 tokens with the template: 4 full blocks
        got = await scorer.with_blocks(RoutingRequest(), "chat", long_body, "ad")
        assert got.blocks == keys and scorer.threaded == 1
        # LoRA and salt change every key; the same salt gives the same keys again.
        salted = scorer.block_keys("chat", {**long_body, "cache_salt": "t"}, "ad")
        assert salted != keys and not set(salted) & set(keys)
        assert scorer.block_keys("chat", {**long_body, "cache_salt": "t"}, "ad") == salted
    finally:
        await scorer.stop()


def test_front_doors_attach_to_the_launched_replicas_event_sources() -> None:
    """`serve --workers N`: each front door's attach entry for launched vLLM replicas names
    their publishers and the model's tokenizer, and passes the checks."""
    from engines.launch.vllm import VLLMEngine

    entry = {
        "name": "m",
        "engine": "vllm",
        "model": "/models/x",
        "replicas": 2,
        "routing": {"scorers": {"kv_cache_hit": 2, "least_outstanding": 1}},
        "options": {"base_port": 8100},
    }
    owned, front = VLLMEngine.attach_entry(entry, "127.0.0.1")
    assert owned["routing"] == entry["routing"]  # the launcher's entry is unchanged
    spec = ModelSpec.model_validate(front)
    assert spec.routing.kv_events.tokenizer_path == "/models/x"
    assert VLLMEngine.check_spec(spec) == []
    sources = VLLMEngine(spec).kv_event_sources(spec.endpoints)
    assert [(s.endpoint, s.replay) for s in sources if s is not None] == [
        ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"),
        ("tcp://127.0.0.1:5559", "tcp://127.0.0.1:5560"),
    ]
