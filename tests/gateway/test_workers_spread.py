"""`gateway serve --workers 4`: how connections reach the front doors.

Proves: by default each front door listens on its own SO_REUSEPORT socket (four listening
sockets on the port, one per front door) and 128 concurrent keep-alive connections land on
every front door; `GATEWAY_REUSE_PORT=false` goes back to one shared listening socket.
Read from /proc (the kernel's socket tables and each process's descriptors), not from the
gateway's own account."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.gateway.procs import (
    LISTEN,
    GatewayProcess,
    connections_held,
    port_listeners,
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


def test_each_front_door_listens_and_gets_connections(tmp_path: Path) -> None:
    gw = GatewayProcess(MODELS, tmp_path, ("--workers", "4")).wait_ready(timeout=180)
    try:
        # Ready means one front door answers; the others may still be starting.
        doors = port_listeners(gw, at_least=4)
        listening = tcp_sockets(gw.port, LISTEN)
        assert len(listening) == 4 and len(doors) == 4
        assert gw.proc.pid not in doors  # the supervisor only holds the port

        async def run() -> dict[int, int]:
            writers = await _hold(gw.port, 128)
            try:
                return connections_held(gw.port, doors)
            finally:
                for w in writers:
                    w.close()

        spread = asyncio.run(run())
        assert sum(spread.values()) == 128
        # A hash spread of 128 over 4: 32 each on average, below 12 about once in 10^4
        # runs per door. One shared socket gave the least-loaded door 14–20 and the
        # busiest 59–64 in three tries of this on a 2-core box.
        assert min(spread.values()) >= 12, spread
    finally:
        assert gw.stop() == 0


def test_reuse_port_off_shares_one_socket(tmp_path: Path) -> None:
    gw = GatewayProcess(MODELS, tmp_path, ("--workers", "2"), GATEWAY_REUSE_PORT="false")
    gw.wait_ready(timeout=180)
    try:
        holders = port_listeners(gw, at_least=3)
        listening = tcp_sockets(gw.port, LISTEN)
        assert len(listening) == 1
        # The supervisor and both front doors hold that one socket (inherited).
        assert len(holders) == 3
    finally:
        assert gw.stop() == 0
