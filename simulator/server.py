"""The simulator server: a `SimState` with a listening socket.

In process (tests)::

    server = SimServer(SimConfig(model="m", itl_ms=5))
    url = await server.start("127.0.0.1", 0)   # "http://127.0.0.1:PORT"
    ...
    await server.stop()

Owns binding, accepting (one `simulator.connection.Connection` per client) and closing.
"""

from __future__ import annotations

import asyncio

from simulator.connection import Connection
from simulator.state import SimState

__all__ = ["SimServer"]


class SimServer(SimState):
    """A simulator you can start and stop; its figures are `SimState`'s."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, backlog=4096, reuse_address=True
        )
        sock = self._server.sockets[0]
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        if self.kv_events is not None:
            self.kv_events.start(bound_host)
        return self.url

    async def stop(self) -> None:
        if self._server is None:
            return
        if self.kv_events is not None:
            await self.kv_events.stop()
        self._server.close()
        for conn in list(self._conns):
            conn.abort()
        await self._server.wait_closed()
        self._server = None
