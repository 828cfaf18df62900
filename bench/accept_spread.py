"""How `gateway serve --workers N` spreads connections over its front doors: one shared
listening socket (`GATEWAY_REUSE_PORT=false`) against one SO_REUSEPORT socket per front
door (the default), side by side in one run.

For each mode: a gateway with N front doors over the simulator (`engine: sim`, served by
the control process), then
1. a burst: 256 keep-alive connections opened at once, each with one request; how many
   each front door holds (read from /proc: the kernel's socket table and each process's
   descriptors);
2. load: four load generators (`python -m loadgen`, streamed, c=64 each, the H200 fleet
   test's shape); the connections each front door holds when most are open (sampled every
   0.5 s), and each front door's CPU seconds over the run.

    .venv/bin/python bench/accept_spread.py [--workers 4] [--requests 640]

A benchmark, not a test: the spread is the kernel's and the event loops' doing, and on a
2-core machine CPU contention moves the load figures; read the two modes side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gateway.procs import (  # noqa: E402
    GatewayProcess,
    connections_held,
    port_listeners,
)

MODELS = [{"name": "m", "engine": "sim", "options": {"ttft_ms": 20, "itl_ms": 20}}]


def spread(gw: GatewayProcess, doors: set[int]) -> list[int]:
    return sorted(connections_held(gw.port, doors).values())


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def burst(port: int, n: int) -> list[asyncio.StreamWriter]:
    async def one() -> asyncio.StreamWriter:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /health/live HTTP/1.1\r\nhost: b\r\n\r\n")
        await w.drain()
        await r.readuntil(b"\r\n\r\n")
        return w

    return list(await asyncio.gather(*(one() for _ in range(n))))


def run_mode(reuse: bool, workers: int, requests: int, tmp: Path) -> dict[str, object]:
    gw = GatewayProcess(
        MODELS,
        tmp,
        ("--workers", str(workers)),
        GATEWAY_REUSE_PORT=str(reuse).lower(),
        GATEWAY_ACCESS_LOG="false",
    ).wait_ready(timeout=180)
    try:
        doors = port_listeners(gw, at_least=workers) - {gw.proc.pid}

        async def held_burst() -> list[int]:
            ws = await burst(gw.port, 256)
            try:
                return spread(gw, doors)
            finally:
                for w in ws:
                    w.close()

        burst_spread = asyncio.run(held_burst())
        time.sleep(1)
        cpu0 = {d: cpu_s(d) for d in doors}
        out = tmp / f"lg-{reuse}"
        out.mkdir()
        gens = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "loadgen", "--base-url", gw.url, "--model", "m"),
                    *("--concurrency", "64", "--num-requests", str(requests)),
                    *("--max-tokens", "64", "--no-progress", "--warmup", "0"),
                    *("--json", str(out / f"{i}.json")),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(4)
        ]
        # The spread when the most connections were open (sampled every 0.5 s).
        load_spread: list[int] = []
        while any(g.poll() is None for g in gens):
            now = spread(gw, doors)
            if sum(now) > sum(load_spread):
                load_spread = now
            time.sleep(0.5)
        cpu = sorted(round(cpu_s(d) - cpu0[d], 2) for d in doors)
        rps = sum(
            float(json.loads(p.read_text())["runs"][0]["summary"]["request_throughput"])
            for p in out.glob("*.json")
        )
        return {"burst": burst_spread, "load": load_spread, "cpu": cpu, "req_s": round(rps, 1)}
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=640, help="per load generator")
    args = ap.parse_args()
    print(f"## {args.workers} front doors; counts sorted, one per front door")
    head = ("mode", "burst of 256", "under load (at peak)", "CPU s per door", "req/s")
    print(f"{head[0]:<20} {head[1]:<19} {head[2]:<22} {head[3]:<18} {head[4]}")
    with tempfile.TemporaryDirectory() as d:
        for reuse in (False, True):
            r = run_mode(reuse, args.workers, args.requests, Path(d))
            name = "SO_REUSEPORT each" if reuse else "one shared socket"
            print(f"{name:<20} {r['burst']!s:<19} {r['load']!s:<22} {r['cpu']!s:<18} {r['req_s']}")


if __name__ == "__main__":
    main()
