"""Key check + limiter add, per request, against Redis on loopback: before and after.

    python bench/keys_limiter.py [--redis redis://127.0.0.1:6379/0] [-n 5000]

Times `Tenancy.authenticate` (hashed key, its record cached in process as in serving) plus
`Tenancy.admit` (one Lua script: RPM, TPM, parallel, budget, the record's version) one
request at a time, then the settlement script on its own, and prints p50/p90/p99 in
milliseconds for two clients of the same scripts, interleaved in blocks of 250 so both see
the same load: "redis-py" (redis-py's asyncio client, before) and "resp" (the pipelined
client of `gateway.state_store.resp`, what serving uses), with the ratios resp / redis-py.
Uses its own key prefix and deletes it after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.base import ServingError, Usage
from gateway.key_admin import KeyAdmin
from gateway.limits import Tenancy
from gateway.settings import Settings
from gateway.state_store import StoreUnavailable
from gateway.state_store import Usage as Spent


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def _one(t: Tenancy, token: str, body: dict[str, object]) -> tuple[float, float] | None:
    """(key check + limiter add, settlement) seconds of one request; None when missed."""
    t0 = time.perf_counter()
    tenant = await t.authenticate(token)
    assert tenant is not None
    try:
        ticket = await t.admit(tenant, "m", body)
    except ServingError:  # the timeout missed (a busy host): counted, not timed
        await asyncio.sleep(1.0)  # the store is retried after RETRY_S
        return None
    t1 = time.perf_counter()
    spent = Spent("m", ticket.reserved, 3, 8, "full")
    try:
        await t.store.settle(tenant.key_id, ticket.limits, spent, "2000-01-01")
    except StoreUnavailable:
        return None
    return t1 - t0, time.perf_counter() - t1


async def main(url: str, n: int, timeout_ms: float) -> None:
    prefix = f"gwbench-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, redis_prefix=prefix, redis_timeout_ms=timeout_ms)
    clients = {"redis-py": Tenancy(settings), "resp": Tenancy(settings)}
    clients["redis-py"].store._fast = None  # type: ignore[attr-defined]  # scripts via redis-py
    for t in clients.values():
        await t.start()
    token, _ = await KeyAdmin(clients["resp"]).create(
        {"rpm": 10**7, "tpm": 10**9, "max_parallel": 10**6}
    )
    body: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    }
    times: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in clients}
    missed = dict.fromkeys(clients, 0)
    for t in clients.values():
        tenant = await t.authenticate(token)
        assert tenant is not None
        for _ in range(200):  # warm the pools and the script cache
            with contextlib.suppress(ServingError):
                t.settle_soon(await t.admit(tenant, "m", body), Usage(3, 8), None, False, 0)
            await t.quiesce()
    block = 250
    for _ in range(0, n, block):
        for name, t in clients.items():
            for _ in range(block):
                got = await _one(t, token, body)
                if got is None:
                    missed[name] += 1
                    continue
                times[name][0].append(got[0])
                times[name][1].append(got[1])
    rows = (("key check + limiter add", 0), ("settlement", 1))
    for step, i in rows:
        for name in clients:
            xs = times[name][i]
            print(
                f"{step:24s} {name:8s} n={len(xs)} p50 {pct(xs, 0.5):.3f} ms  "
                f"p90 {pct(xs, 0.9):.3f} ms  p99 {pct(xs, 0.99):.3f} ms  "
                f"mean {statistics.fmean(xs) * 1000:.3f} ms"
            )
        old, new = times["redis-py"][i], times["resp"][i]
        print(
            f"{step:24s} ratio resp / redis-py: p50 {pct(new, 0.5) / pct(old, 0.5):.2f}  "
            f"p90 {pct(new, 0.9) / pct(old, 0.9):.2f}  p99 {pct(new, 0.99) / pct(old, 0.99):.2f}"
        )
    print(f"requests that missed the {timeout_ms:g} ms timeout: {missed}")
    r = clients["resp"].store._redis  # type: ignore[attr-defined]
    keys = [k async for k in r.scan_iter(f"{prefix}:*")]
    if keys:
        await r.delete(*keys)
    for t in clients.values():
        await t.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("-n", type=int, default=5000)
    p.add_argument("--timeout-ms", type=float, default=50.0)
    a = p.parse_args()
    asyncio.run(main(a.redis, a.n, a.timeout_ms))
