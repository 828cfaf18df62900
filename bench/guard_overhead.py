"""What the server limits cost on the hot path: the gateway with uvicorn's plain httptools
protocol against the same gateway with `gateway.server_limits`' guarded one, side by side.

    .venv/bin/python bench/guard_overhead.py [--rounds 4] [--seconds 3] [--concurrency 16]
    .venv/bin/python bench/guard_overhead.py --micro [--rounds 80]

`--micro`: the protocols alone in this process (no sockets, no gateway): one keep-alive
connection on an in-memory transport, a typical chat request fed to `data_received` and
answered by a trivial app; per round 1000 requests on each protocol, paired, CPU time
(`time.process_time`, less disturbed by a shared machine than wall time).

Starts the simulator (zero latency) and two gateways attaching it (`engine: openai`), one
per protocol, each its own process; then alternates closed-loop runs of non-streamed chat
requests A B B A ... on one pooled client, and reads each gateway's CPU time from /proc
around its runs. Prints requests/s and gateway CPU µs per request for each, and the
guarded/plain ratios. Loopback only; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `gateway` importable
    sys.path.insert(0, str(REPO))
TICK = os.sysconf("SC_CLK_TCK")

RUNNER = """
import sys, uvicorn
from gateway.app import create_app
from gateway.server_limits import uvicorn_config
from gateway.settings import Settings
s = Settings(config=sys.argv[1], port=int(sys.argv[2]), log_level="warning")
over = {"http": "httptools"} if sys.argv[3] == "plain" else {}
uvicorn.Server(uvicorn_config(create_app(s), s, **over)).run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def wait_up(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.2)


async def closed_loop(session: aiohttp.ClientSession, url: str, conc: int, seconds: float) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    end = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            async with session.post(url, json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}")
            done += 1

    await asyncio.gather(*(worker() for _ in range(conc)))
    return done


def start(procs: list[subprocess.Popen[bytes]]) -> tuple[str, dict[str, tuple[int, str]]]:
    """The simulator and the two gateways (plain, guarded): (sim URL, mode → (pid, URL))."""
    sim_port = free_port()
    sim = [sys.executable, "-m", "gateway", "sim", "--port", str(sim_port), "--model", "m"]
    procs.append(subprocess.Popen([*sim, "--ttft-ms", "0", "--itl-ms", "0"], cwd=REPO))
    cfg = Path(tempfile.mkdtemp()) / "models.yaml"
    cfg.write_text(
        f"models:\n  - name: m\n    engine: openai\n    endpoints: [http://127.0.0.1:{sim_port}]\n"
    )
    gws: dict[str, tuple[int, str]] = {}
    for mode in ("plain", "guarded"):
        port = free_port()
        p = subprocess.Popen([sys.executable, "-c", RUNNER, str(cfg), str(port), mode], cwd=REPO)
        procs.append(p)
        gws[mode] = (p.pid, f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{sim_port}", gws


async def measure(args: argparse.Namespace, sim: str, gws: dict[str, tuple[int, str]]) -> None:
    await wait_up(sim + "/health")
    for _pid, url in gws.values():
        await wait_up(url + "/health")
    totals = {m: [0, 0.0, 0.0] for m in gws}  # requests, seconds, cpu seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _pid, url in gws.values():  # warm-up
            await closed_loop(session, url + "/v1/chat/completions", args.concurrency, 1.0)
        order: list[str] = []
        for r in range(args.rounds):
            order += ["plain", "guarded"] if r % 2 == 0 else ["guarded", "plain"]
        for mode in order:
            pid, url = gws[mode]
            c0, t0 = cpu_s(pid), time.monotonic()
            n = await closed_loop(
                session, url + "/v1/chat/completions", args.concurrency, args.seconds
            )
            t, c = time.monotonic() - t0, cpu_s(pid) - c0
            totals[mode][0] += n
            totals[mode][1] += t
            totals[mode][2] += c
            print(f"{mode:8s} {n / t:8.1f} req/s  {c / n * 1e6:7.1f} µs CPU/req", flush=True)
    rate = {m: v[0] / v[1] for m, v in totals.items()}
    cpu = {m: v[2] / v[0] * 1e6 for m, v in totals.items()}
    for m in gws:
        print(f"total {m:8s} {rate[m]:8.1f} req/s  {cpu[m]:7.1f} µs CPU/req")
    print(
        f"guarded/plain: throughput {rate['guarded'] / rate['plain']:.3f}, "
        f"CPU per request {cpu['guarded'] / cpu['plain']:.3f}"
    )


_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
_REQ = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
    b"Accept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.0\r\nAuthorization: Bearer x\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class _Transport:
    """Enough of an asyncio transport for uvicorn's protocol."""

    def __init__(self) -> None:
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(key, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _micro_run(cls: Any, n: int) -> float:
    """CPU µs per request of `n` requests on one connection of protocol `cls`."""
    import uvicorn
    from uvicorn.server import ServerState

    cfg = uvicorn.Config(_ok_app, http=cls, log_level="warning", lifespan="off")
    cfg.load()
    proto = cls(
        config=cfg, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    t = _Transport()
    proto.connection_made(t)
    t0 = time.process_time()
    for _ in range(n):
        proto.data_received(_REQ)
        for _ in range(4):  # let the request's task run to its response
            await asyncio.sleep(0)
    took = time.process_time() - t0
    if t.writes < n:
        raise RuntimeError(f"{cls.__name__}: {t.writes} answers to {n} requests")
    proto.connection_lost(None)
    return took / n * 1e6


async def micro(rounds: int) -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.server_limits import guarded_protocol
    from gateway.settings import Settings

    plain, guarded = HttpToolsProtocol, guarded_protocol(Settings())
    ratios, cost = [], {"plain": [], "guarded": []}
    for r in range(rounds):
        order = [("plain", plain), ("guarded", guarded)]
        got = {
            name: await _micro_run(cls, 1000)
            for name, cls in (order if r % 2 == 0 else order[::-1])
        }
        ratios.append(got["guarded"] / got["plain"])
        for k, v in got.items():
            cost[k].append(v)
    ratios.sort()
    q = len(ratios) // 4
    for k, v in cost.items():
        v.sort()
        print(f"{k:8s} CPU per request: min {v[0]:.1f} µs, median {v[len(v) // 2]:.1f} µs")
    print(
        f"paired guarded/plain CPU per request: median {ratios[len(ratios) // 2]:.3f} "
        f"(quartiles {ratios[q]:.3f}..{ratios[-q - 1]:.3f}, {rounds} rounds)"
    )


def main(args: argparse.Namespace) -> None:
    if args.micro:
        import uvloop

        uvloop.run(micro(args.rounds))
        return
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim, gws = start(procs)
        asyncio.run(measure(args, sim, gws))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--micro", action="store_true", help="the protocols alone, in-process")
    main(ap.parse_args())
