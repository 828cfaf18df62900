"""Interleaved A/B of the stream relay's CPU: several checkouts of this gateway in front of
one simulator, measured in alternating rounds, so that a shared machine's load falls on
all of them alike.

    .venv/bin/python bench/relay_ab.py CHECKOUT [CHECKOUT ...] [--concurrency 64]

Each CHECKOUT (a directory: this tree, or a `git worktree` of another commit) is served by
`gateway serve` exactly as bench/overhead.py serves the gateway, pinned to CPU 1; the
simulator (TTFT 10 ms, 20 ms between chunks, 32 tokens) and the load generator share CPU 0.
Per round every checkout gets the same streamed load (order reversed every other round);
the result is each one's CPU seconds (user + system, from /proc) per 1,000 requests and per
relayed chunk, and its ratio to the first checkout.

Owns only this comparison; bench/overhead.py (which measures one target after another)
compares against the peers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers import MODEL, TARGETS, Proc, free_port, sim_proc  # noqa: E402
from loadgen import LoadConfig, open_session, run_load  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    work = REPO / "bench" / "results" / time.strftime("relay-ab-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    sim_port = free_port()
    sim = sim_proc(work, sim_port, args.ttft_ms, args.itl_ms, args.max_tokens)
    sim.start()
    sim_url = f"http://127.0.0.1:{sim_port}"
    gateways = []
    try:
        await sim.wait_ready(sim_url + "/v1/models", {}, 30)
        for i, checkout in enumerate(args.checkouts):
            target = replace(TARGETS["gateway"], name=f"g{i}", repo=REPO / checkout)
            port = free_port()
            wd = work / f"g{i}"
            wd.mkdir()
            argv, env = target.command(port, sim_url, wd)
            proc = Proc(f"g{i}", argv, wd / "gateway.log", env=env, cpu=1, cwd=wd)
            proc.start()
            url = f"http://127.0.0.1:{port}"
            await proc.wait_ready(url + "/v1/models", {}, 60)
            gateways.append((checkout, proc, url, open_session(0)))

        def load(url: str, n: int, seed: int) -> LoadConfig:
            return LoadConfig(base_url=url, model=MODEL, stream=True, max_tokens=args.max_tokens,
                              progress=False, concurrency=args.concurrency, num_requests=n,
                              seed=seed)  # fmt: skip

        for _, _, url, sess in gateways:  # warm-up: open the connections
            await run_load(load(url, args.concurrency, 0), sess)
        cpu = {g[0]: 0.0 for g in gateways}
        done = {g[0]: 0 for g in gateways}
        chunks = {g[0]: 0 for g in gateways}
        for r in range(args.rounds):
            for checkout, proc, url, sess in gateways if r % 2 == 0 else gateways[::-1]:
                before = proc.cpu_seconds()
                res = await run_load(load(url, args.requests, r), sess)
                cpu[checkout] += proc.cpu_seconds() - before
                done[checkout] += len(res.records)
                chunks[checkout] += sum(rec.output_chunks for rec in res.records)
        first = gateways[0][0]
        base = cpu[first] / done[first]
        load_avg = os.getloadavg()[0]
        print(
            f"concurrency {args.concurrency}, {args.rounds} rounds x {args.requests} "
            f"requests, {args.max_tokens} tokens, load average {load_avg:.2f} at the end"
        )
        for checkout, _, url, sess in gateways:
            per_req = cpu[checkout] / done[checkout]
            per_chunk = cpu[checkout] / max(chunks[checkout], 1)
            print(
                f"{checkout}: {per_req * 1000:.3f} CPU-s / 1k requests, "
                f"{per_chunk * 1e6:.1f} us / output chunk, "
                f"ratio to the first {per_req / base:.3f} ({done[checkout]} requests)"
                f"{await _paths(sess, url)}"
            )
    finally:
        for _, proc, _, sess in gateways:
            await sess.close()
            proc.stop()
        sim.stop()


async def _paths(sess: aiohttp.ClientSession, url: str) -> str:
    """ ", direct path N % of M blocks" from the gateway's gateway_stream_blocks_total (warm-up
    included), or "" for a checkout that does not count them."""
    async with sess.get(url + "/metrics") as r:
        text = await r.text()
    n = {"direct": 0.0, "loop": 0.0}
    for line in text.splitlines():
        if line.startswith("gateway_stream_blocks_total{"):
            n[line.split('path="', 1)[1].split('"', 1)[0]] += float(line.rsplit(" ", 1)[1])
    total = n["direct"] + n["loop"]
    return f", direct path {100 * n['direct'] / total:.1f} % of {total:.0f} blocks" if total else ""


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("checkouts", nargs="+", help="gateway checkouts (directories)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=640, help="requests per checkout per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ttft-ms", type=float, default=10.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    a = p.parse_args()
    os.sched_setaffinity(0, {0})  # the load generator shares CPU 0 with the simulator
    asyncio.run(main(a))
