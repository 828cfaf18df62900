"""`python -m simulator` (also `gateway sim`): run one simulator server until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from simulator.config import SimConfig, config_from_args
from simulator.server import SimServer


async def _serve(config: SimConfig, host: str, port: int) -> None:
    server = SimServer(config)
    url = await server.start(host, port)
    c = config
    print(
        f"gateway-sim: vLLM-compatible SIMULATOR (not a real model) serving {c.model!r} at "
        f"{url}  ttft={c.ttft_ms}ms itl={c.itl_ms}ms jitter={c.jitter} "
        f"max_running={c.max_running or 'unlimited'}"
        + (f" FAULTS error_rate={c.error_rate}" if c.error_rate else "")
        + (f" stall_ms={c.stall_ms}" if c.stall_ms else "")
        + (f" drop_after={c.drop_after}" if c.drop_after is not None else ""),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def serve_main(argv: list[str]) -> int:
    """Run a simulator server until SIGINT/SIGTERM (`gateway sim ...`)."""
    config, host, port = config_from_args(argv)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    runner(_serve(config, host, port))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve_main(sys.argv[1:]))
