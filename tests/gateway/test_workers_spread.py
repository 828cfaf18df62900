"""`gateway serve --workers 4`: how connections reach the front doors.

Proves: by default each front door listens on its own SO_REUSEPORT socket (four listening
sockets on the port, one per front door) and 128 concurrent keep-alive connections land on
every front door; `GATEWAY_REUSE_PORT=false` goes back to one shared listening socket.
Read from /proc (the kernel's socket tables and each process's descriptors), not from the
gateway's own account."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from tests.gateway.procs import (
    ESTABLISHED,
    LISTEN,
    GatewayProcess,
    descendants,
    socket_holders,
    tcp_sockets,
)

MODELS = [{"name": "m", "engine": "sim", "options": {"itl_ms": 1}}]


async def _hold(port: int, n: int) -> list[asyncio.StreamWriter]:
    async def one() -> asyncio.StreamWriter:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /health/live HTTP/1.1\r\nhost: t\r\n\r\n")
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        return w

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _listeners(gw: GatewayProcess) -> set[int]:
    """The processes holding a listening socket on the gateway's port (the control
    process, which serves the simulator, listens on a port of its own)."""
    listening = tcp_sockets(gw.port, LISTEN)
    held = socket_holders(descendants(gw.proc.pid) | {gw.proc.pid})
    return {pid for inode in listening for pid in held.get(inode, ())}


def test_each_front_door_listens_and_gets_connections(tmp_path: Path) -> None:
    gw = GatewayProcess(MODELS, tmp_path, ("--workers", "4")).wait_ready(timeout=180)
    try:
        # Ready means one front door answers; the others may still be starting.
        deadline = time.monotonic() + 120
        while len(tcp_sockets(gw.port, LISTEN)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        listening = tcp_sockets(gw.port, LISTEN)
        doors = _listeners(gw)
        assert len(listening) == 4 and len(doors) == 4
        assert gw.proc.pid not in doors  # the supervisor only holds the port

        async def run() -> Counter[int]:
            writers = await _hold(gw.port, 128)
            try:
                held = socket_holders(doors)
                est = tcp_sockets(gw.port, ESTABLISHED)
                return Counter(pid for i in est for pid in held.get(i, ()))
            finally:
                for w in writers:
                    w.close()

        spread = asyncio.run(run())
        assert sum(spread.values()) == 128
        assert set(spread) == doors
        # A hash spread of 128 over 4: 32 each on average, below 12 about once in 10^4
        # runs per door. One shared socket gave 14–22 to the least-loaded door and
        # 59–64 to the busiest on this box (bench/accept_spread.py).
        assert min(spread.values()) >= 12, spread
    finally:
        assert gw.stop() == 0


def test_reuse_port_off_shares_one_socket(tmp_path: Path) -> None:
    gw = GatewayProcess(MODELS, tmp_path, ("--workers", "2"), GATEWAY_REUSE_PORT="false")
    gw.wait_ready(timeout=180)
    try:
        deadline = time.monotonic() + 120
        while len(_listeners(gw)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        listening = tcp_sockets(gw.port, LISTEN)
        assert len(listening) == 1
        # The supervisor and both front doors hold that one socket (inherited).
        assert len(_listeners(gw)) == 3
    finally:
        assert gw.stop() == 0
