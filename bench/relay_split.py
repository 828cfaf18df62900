"""Where a streaming proxy's CPU goes: user vs kernel time, and a fixed cost per request
against a cost per relayed chunk, for this gateway beside the Rust routers.

    .venv/bin/python bench/relay_split.py [--concurrency 256] [--tokens 4,64]
        [--targets gateway,vllm-router] [--requests 4096]

Each target is served exactly as bench/overhead.py serves it, pinned to CPU 1, in front of
one simulator (TTFT 10 ms, 20 ms between chunks) that shares CPU 0 with the load
generator. Per target and per answer length (`--tokens`, the requests' `max_tokens`), one
streamed run of `--requests` at `--concurrency`; the proxy's user and system CPU seconds
come from /proc (its threads summed) around that run. With two answer lengths the costs
are split by a straight line through the two points: per relayed chunk (the slope, over
the chunks the load generator counted) and per request (the rest).

`--syscalls` counts the proxy's system calls instead (`strace -c -f` attached around one
run per target at the last answer length; strace slows the proxy, so no CPU is read in
that mode): calls per request and per relayed chunk, by system call.

Owns this decomposition only: bench/overhead.py compares the targets' latency and total
CPU, bench/relay_ab.py checkouts of this gateway against each other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers import MODEL, TARGETS, Proc, ensure_installed, free_port, sim_proc  # noqa: E402
from loadgen import LoadConfig, open_session, run_load  # noqa: E402


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process `pid`, all its threads."""
    hz = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a thread that just ended
        user += int(fields[11])
        system += int(fields[12])
    return user / hz, system / hz


async def measure(
    name: str, sim_url: str, work: Path, args: argparse.Namespace, tokens: list[int]
) -> list[tuple[int, float, float, int]]:
    """(max_tokens, user s, system s, chunks) per answer length, for one target."""
    target = TARGETS[name]
    port = free_port()
    wd = work / name
    wd.mkdir()
    argv, env = target.command(port, sim_url, wd)
    proc = Proc(name, argv, wd / "proxy.log", env=env, cpu=1, cwd=wd)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    sess = open_session(0)
    out = []
    try:
        await proc.wait_ready(url + "/v1/models", {}, 60)
        assert proc.popen is not None
        for max_tokens in tokens:

            def load(n: int, max_tokens: int = max_tokens) -> LoadConfig:
                return LoadConfig(base_url=url, model=MODEL, stream=True, max_tokens=max_tokens,
                                  progress=False, concurrency=args.concurrency, num_requests=n,
                                  seed=0)  # fmt: skip

            await run_load(load(args.concurrency), sess)  # warm-up: open the connections
            if args.syscalls:
                if max_tokens == tokens[-1]:
                    await count_syscalls(name, proc.popen.pid, load(args.requests), sess, wd)
                continue
            u0, s0 = user_system_seconds(proc.popen.pid)
            res = await run_load(load(args.requests), sess)
            u1, s1 = user_system_seconds(proc.popen.pid)
            failed = sum(1 for r in res.records if r.error)
            if failed:
                raise SystemExit(f"{name}: {failed} of {len(res.records)} requests failed")
            chunks = sum(r.output_chunks for r in res.records)
            out.append((max_tokens, u1 - u0, s1 - s0, chunks))
            n = args.requests
            print(
                f"  {name:14s} max_tokens={max_tokens:<4d} user {1000 * (u1 - u0) / n:.3f}"
                f"  system {1000 * (s1 - s0) / n:.3f} CPU-s / 1k requests"
                f"  ({chunks / n:.1f} chunks each)",
                flush=True,
            )
    finally:
        await sess.close()
        proc.stop()
    return out


async def count_syscalls(name: str, pid: int, cfg: LoadConfig, sess: Any, wd: Path) -> None:
    """`strace -c -f` on the proxy around one run; print calls per request and per chunk."""
    table = wd / "strace.txt"
    strace = await asyncio.create_subprocess_exec(
        *("strace", "-c", "-f", "-o", str(table), "-p", str(pid)), stderr=subprocess.DEVNULL
    )
    await asyncio.sleep(2)  # attached to every thread before the first request
    res = await run_load(cfg, sess)
    strace.send_signal(signal.SIGINT)
    await asyncio.wait_for(strace.wait(), 30)
    n = len(res.records)
    chunks = sum(r.output_chunks for r in res.records)
    print(f"  {name}: {n} requests, {chunks / n:.1f} chunks each; system calls:")
    for line in table.read_text().splitlines():
        cols = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(cols) >= 5 and cols[3].isdigit() and cols[-1] != "total":
            calls = int(cols[3])
            each = f"{calls / n:8.2f} per request {calls / chunks:7.3f} per chunk"
            print(f"    {cols[-1]:16s} {each}")


def split(points: list[tuple[int, float, float, int]], n: int) -> str:
    """Per request and per chunk, user and system, in µs, from the first and last points."""
    (_, u1, s1, c1), (_, u2, s2, c2) = points[0], points[-1]
    parts = []
    for label, a, b in (("user", u1, u2), ("system", s1, s2)):
        per_chunk = (b - a) / (c2 - c1)
        fixed = (a - per_chunk * c1) / n
        parts.append(f"{label} {fixed * 1e6:.0f} µs/request + {per_chunk * 1e6:.2f} µs/chunk")
    return "; ".join(parts)


async def main(args: argparse.Namespace) -> None:
    tokens = [int(t) for t in args.tokens.split(",")]
    names = args.targets.split(",")
    for name in names:
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
        if name != "gateway":
            ensure_installed(TARGETS[name], print)
    work = REPO / "bench" / "results" / time.strftime("relay-split-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    sim_port = free_port()
    sim = sim_proc(work, sim_port, 10.0, 20.0, max(tokens))
    sim.start()
    results = {}
    try:
        sim_url = f"http://127.0.0.1:{sim_port}"
        await sim.wait_ready(sim_url + "/v1/models", {}, 30)
        print(f"concurrency {args.concurrency}, {args.requests} streamed requests per point")
        for name in names:
            results[name] = await measure(name, sim_url, work, args, tokens)
    finally:
        sim.stop()
    if len(tokens) >= 2 and not args.syscalls:
        print(f"split (max_tokens {tokens[0]} and {tokens[-1]}):")
        for name, points in results.items():
            print(f"  {name:14s} {split(points, args.requests)}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--targets", default="gateway,vllm-router,sglang-router")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--requests", type=int, default=4096)
    p.add_argument("--tokens", default="4,64", help="answer lengths (max_tokens), comma list")
    p.add_argument("--syscalls", action="store_true", help="count system calls (strace)")
    a = p.parse_args()
    os.sched_setaffinity(0, {0})  # the load generator shares CPU 0 with the simulator
    asyncio.run(main(a))
