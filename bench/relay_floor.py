"""The floor of a Python relay: CPU per 1,000 streamed requests for a byte splice on uvloop
(no HTTP parsing at all: each client connection gets one upstream connection and bytes are
copied both ways in `data_received`), against this gateway and vllm-router, side by side
in one run over the same simulator.

If even the splice, which does less than any HTTP proxy can, costs more CPU than the Rust
router, no Python relay reaches the issue-11 bar (≤ 1.1× the better Rust router) and the
pass-through path has to be compiled.

    .venv/bin/python bench/relay_floor.py [--concurrency 64] [--rounds 4] [--requests 640]
    .venv/bin/python bench/relay_floor.py splice --port P --upstream HOST:PORT   # the splice

Each proxy is pinned to CPU 1, the simulator (TTFT 10 ms, 20 ms between chunks, 32
tokens) and the load generator to CPU 0; rounds alternate the targets' order; CPU from
/proc. vllm-router comes from bench/.venvs (bench/overhead.py installs it on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers import MODEL, TARGETS, VENVS, Proc, free_port, sim_proc  # noqa: E402
from loadgen import LoadConfig, open_session, run_load  # noqa: E402

HIGH_WATER = 256 * 1024


class _Half(asyncio.Protocol):
    """One side of a spliced pair: what it receives is written to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []  # received before the peer connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not registered as asyncio.Transport subclasses.)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def pause_writing(self) -> None:  # our transport is full: stop reading the peer
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def splice(port: int, upstream: str) -> None:
    host, up_port = upstream.rsplit(":", 1)
    loop = asyncio.get_running_loop()

    class Client(_Half):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.connecting = loop.create_task(self.connect())

        async def connect(self) -> None:
            try:
                _, up = await loop.create_connection(_Half, host, int(up_port))
            except OSError:
                if self.transport is not None:
                    self.transport.close()
                return
            up.peer, self.peer = self, up
            for data in self.pending:
                assert up.transport is not None
                up.transport.write(data)
            self.pending.clear()

    server = await loop.create_server(Client, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


async def compare(args: argparse.Namespace) -> None:
    work = REPO / "bench" / "results" / time.strftime("relay-floor-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    sim_port = free_port()
    sim = sim_proc(work, sim_port, 10, 20, args.max_tokens)
    sim.start()
    sim_url = f"http://127.0.0.1:{sim_port}"
    targets: list[tuple[str, Proc, str]] = []
    sessions = []
    try:
        await sim.wait_ready(sim_url + "/v1/models", {}, 30)
        port = free_port()
        floor = Proc(
            "splice",
            [sys.executable, __file__, "splice", "--port", str(port), "--upstream",
             f"127.0.0.1:{sim_port}"],
            work / "splice.log", env={"PYTHONPATH": str(REPO)}, cpu=1, cwd=REPO,
        )  # fmt: skip
        targets.append(("uvloop splice (floor)", floor, f"http://127.0.0.1:{port}"))
        for name in ("gateway", "vllm-router"):
            t = TARGETS[name]
            if t.requirement is not None and not (VENVS / name).exists():
                print(f"{name}: not installed (run bench/overhead.py once); skipped")
                continue
            port = free_port()
            wd = work / name
            wd.mkdir()
            argv, env = t.command(port, sim_url, wd)
            targets.append((name, Proc(name, argv, wd / "log", env=env, cpu=1, cwd=wd),
                            f"http://127.0.0.1:{port}"))  # fmt: skip
        for _, proc, url in targets:
            proc.start()
            await proc.wait_ready(url + "/v1/models", {}, 60)

        def load(url: str, n: int, seed: int) -> LoadConfig:
            return LoadConfig(base_url=url, model=MODEL, stream=True, max_tokens=args.max_tokens,
                              progress=False, concurrency=args.concurrency, num_requests=n,
                              seed=seed)  # fmt: skip

        sessions = [open_session(0) for _ in targets]
        for (_, _, url), sess in zip(targets, sessions, strict=True):
            await run_load(load(url, args.concurrency, 0), sess)  # warm-up
        cpu = [0.0] * len(targets)
        done = [0] * len(targets)
        failed = [0] * len(targets)
        order = list(range(len(targets)))
        for r in range(args.rounds):
            for i in order if r % 2 == 0 else order[::-1]:
                _, proc, url = targets[i]
                before = proc.cpu_seconds()
                res = await run_load(load(url, args.requests, r), sessions[i])
                cpu[i] += proc.cpu_seconds() - before
                done[i] += sum(1 for rec in res.records if rec.ok)
                failed[i] += sum(1 for rec in res.records if not rec.ok)
        print(
            f"streamed, concurrency {args.concurrency}, {args.rounds} rounds x {args.requests} "
            f"requests of {args.max_tokens} tokens; load average {os.getloadavg()[0]:.2f}"
        )
        for i, (name, _, _) in enumerate(targets):
            per_1k = cpu[i] / max(done[i], 1) * 1000
            print(f"{name:<24} {per_1k:6.3f} CPU-s / 1k requests  ok {done[i]}  failed {failed[i]}")
    finally:
        for sess in sessions:
            await sess.close()
        for _, proc, _ in targets:
            proc.stop()
        sim.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("splice", help="run the splice proxy")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--upstream", required=True, help="HOST:PORT")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=640, help="per target per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args()
    if a.cmd == "splice":
        import uvloop

        uvloop.run(splice(a.port, a.upstream))
        return
    os.sched_setaffinity(0, {0})  # the load generator shares CPU 0 with the simulator
    asyncio.run(compare(a))


if __name__ == "__main__":
    main()
