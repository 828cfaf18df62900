"""Three `gateway serve` processes sharing the real Redis (own key prefix) in front of one
simulator: the limiter holds across processes under 1,000 concurrent requests over 50 keys,
every token reservation is settled once traffic stops, and the usage ledger matches the
engine's own token counters over mixed requests with 20 % client aborts."""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway.procs import (
    SHARED_REDIS,
    GatewayProcess,
    SimProcess,
    clean_prefix,
    new_prefix,
)
from tests.gateway.test_tenancy import ADMIN, settled

RPM = 10  # the GCRA bucket holds one minute: a burst of 10, then one every 6 s
# The issue asks for 10,000 requests; on the shared 2-core box the whole fleet (three
# gateways, the simulator and this client) relays about 115 requests/s, so 10,000 cost
# 86 s of test call (measured, passing): the default, 5,000 (measured 35 s call + 23 s
# start and stop), is what fits the ~60 s CI budget; GATEWAY_TEST_USAGE_REQUESTS=10000 is
# the full run.
USAGE_REQUESTS = int(os.environ.get("GATEWAY_TEST_USAGE_REQUESTS", "5000"))
USAGE_CONCURRENCY = 256


# Per test: the usage check must not inherit the prompt-size estimate the limiter test
# taught the gateways (aborted streams are billed by it).
@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fleet")
    # Workers in processes of their own, as vLLM runs (the usage test compares the ledger
    # with their /metrics counters), 10 ms between tokens. `m`: two tokens per streamed
    # delta, as vLLM sends under load (counting events would bill half); `m1`: one.
    args = ("--itl-ms", "10", "--max-running", "4096", "--tokens-per-chunk")
    sims = {
        name: SimProcess(tmp, "--model", name, *args, per)
        for name, per in (("m", "2"), ("m1", "1"))
    }
    for sim in sims.values():
        sim.wait_ready()
    prefix = new_prefix()
    models = [{"name": n, "engine": "openai", "endpoints": [s.url]} for n, s in sims.items()]
    # The default 50 ms Redis timeout is tested by the outage test; here the limiter's
    # correctness is, on a shared 2-core box whose load (≈ 8) starves event loops for longer.
    env = {
        "GATEWAY_REDIS_URL": SHARED_REDIS,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_REDIS_TIMEOUT_MS": "1000",
        # Every test client comes from 127.0.0.1: lift the per-client connection cap.
        "GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "2000",
    }
    gws = [GatewayProcess(models, tmp, **env) for _ in range(3)]
    try:
        for g in gws:
            g.wait_ready()
        yield {"gws": gws, "sims": sims, "prefix": prefix}
    finally:
        for g in gws:
            g.stop()
        for sim in sims.values():
            sim.stop()
        clean_prefix(prefix)


def _create(url: str, **policy: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/admin/keys", json=policy, headers=ADMIN)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_limiter_holds_across_three_processes(fleet: dict[str, Any]) -> None:
    gws: list[GatewayProcess] = fleet["gws"]
    keys = [_create(gws[i % 3].url, rpm=RPM, tpm=100_000) for i in range(50)]
    jobs = [(keys[i % 50], gws[i % 3]) for i in range(1000)]
    random.Random(7).shuffle(jobs)

    async def run() -> tuple[list[tuple[str, int, str]], float]:
        # No keep-alive: a pooled connection the server closes for idling while this
        # client reuses it fails with ReadError, and the request's fate would be unknown.
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def one(key: dict[str, Any], gw: GatewayProcess) -> tuple[str, int, str]:
                r = await client.post(
                    f"{gw.url}/v1/chat/completions",
                    json={
                        "model": "m",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2,
                    },
                    headers={"authorization": f"Bearer {key['key']}"},
                )
                code = r.json()["error"]["code"] if r.status_code != 200 else ""
                return key["id"], r.status_code, code

            t0 = time.monotonic()
            out = await asyncio.gather(*(one(k, g) for k, g in jobs))
            return out, time.monotonic() - t0

    results, elapsed = asyncio.run(run())
    assert {(s, c) for _, s, c in results} <= {(200, ""), (429, "rate_limit_exceeded")}
    admitted = Counter(k for k, s, _ in results if s == 200)
    # GCRA: at most the burst plus one per emission interval elapsed, whichever process.
    bound = RPM + math.ceil(elapsed / (60 / RPM))
    assert max(admitted.values()) <= bound, (admitted.most_common(3), elapsed)
    assert len(admitted) == 50 and min(admitted.values()) >= RPM  # each got its burst

    # Quiesce: nothing in flight, every reservation returned, the ledger matches.
    for key in keys:
        u = settled(gws[0].url, key["id"])
        assert (u["in_flight"], u["reserved_tokens"]) == (0, 0), u
        (day,) = u["days"].values()
        assert day["m"]["requests_full"] == admitted[key["id"]]
        assert day["m"]["completion_tokens"] == 2 * admitted[key["id"]]


def _sim_tokens(sim: SimProcess) -> tuple[int, int]:
    """(prompt + generated tokens, of which never sent: held for a delta when the client
    left) by the worker's own /metrics."""
    counted = sim.counter("vllm:prompt_tokens_total") + sim.counter("vllm:generation_tokens_total")
    return int(counted), int(sim.counter("gateway_sim:unsent_tokens_total"))


def test_usage_matches_engine_counters_with_aborts(fleet: dict[str, Any]) -> None:
    gws: list[GatewayProcess] = fleet["gws"]
    sims: dict[str, SimProcess] = fleet["sims"]
    keys = [_create(gws[0].url) for _ in range(5)]
    rng = random.Random(11)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    total = USAGE_REQUESTS
    before = {name: _sim_tokens(sim) for name, sim in sims.items()}

    async def run() -> Counter[str]:
        seen: Counter[str] = Counter()
        sem = asyncio.Semaphore(USAGE_CONCURRENCY)
        limits = httpx.Limits(max_connections=USAGE_CONCURRENCY, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def one(i: int) -> None:
                key = keys[i % len(keys)]
                gw = gws[i % 3]
                text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
                chat = i % 2 == 0
                abort = rng.random() < 0.2
                # An aborted stream is still generating when its client leaves (cut after
                # at most 6 chunks, 10 or 20 ms apart; it runs 200..400 tokens, 2 s or more,
                # so that a client the loaded box slows still leaves mid-generation: with
                # 30..120 a CI run saw 10 % of the streams end early instead of 20 %).
                tokens = rng.randint(200, 400) if abort else rng.randint(4, 24)
                body: dict[str, Any] = {"model": ("m", "m1")[i // 2 % 2], "max_tokens": tokens}
                if chat:
                    body["messages"] = [{"role": "user", "content": text}]
                else:
                    body["prompt"] = text
                stream = abort or rng.random() < 0.5
                body["stream"] = stream
                path = "/v1/chat/completions" if chat else "/v1/completions"
                headers = {"authorization": f"Bearer {key['key']}"}
                async with sem:
                    if not stream:
                        r = await client.post(f"{gw.url}{path}", json=body, headers=headers)
                        assert r.status_code == 200, r.text
                        seen["full"] += 1
                        return
                    cut = rng.randint(1, 6)
                    async with client.stream(
                        "POST", f"{gw.url}{path}", json=body, headers=headers
                    ) as r:
                        assert r.status_code == 200
                        n = 0
                        async for _ in r.aiter_raw():
                            n += 1
                            if abort and n >= cut:
                                break
                    seen["aborted" if abort else "full"] += 1

            await asyncio.gather(*(one(i) for i in range(total)))
        return seen

    seen = asyncio.run(run())
    assert seen["aborted"] > 0.15 * total
    ledger: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for key in keys:
        u = settled(gws[1].url, key["id"])
        assert (u["in_flight"], u["reserved_tokens"]) == (0, 0), u
        for models in u["days"].values():
            for name, m in models.items():
                ledger[name] += m["prompt_tokens"] + m["completion_tokens"]
                outcomes.update({k[9:]: v for k, v in m.items() if k.startswith("requests_")})
    # The streams really were cut while generating: the gateways saw ~20 % of them end early.
    assert outcomes["full"] + outcomes["aborted"] == total, outcomes
    assert outcomes["aborted"] > 0.15 * total, outcomes
    drift = {}
    for name, sim in sims.items():
        counted, unsent = (a - b for a, b in zip(_sim_tokens(sim), before[name], strict=True))
        drift[name] = (ledger[name], counted, unsent)
    # A cut stream is counted by the worker's own tokenizer (its /tokenize) over every event
    # the worker sent, those it sent after the client left included (read off the
    # half-closed connection). So the ledger is the worker's counters less the tokens the
    # worker generated and never sent (held for its next two-token delta when the client
    # left: no relay sees those; vLLM's counters count them the same way). The bar, 0.1 %:
    for ledger_n, counted, unsent in drift.values():
        assert abs(counted - unsent - ledger_n) <= 0.001 * counted, drift
    # One token per delta, nothing is held: the ledger is within 0.1 % of the counters.
    assert drift["m1"][2] == 0, drift
