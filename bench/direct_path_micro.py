"""The stream relay's direct path in isolation: the Python cost of one plain chunk from the
upstream connection's `data_received` to the client transport's `write`, and the cost of
the checks that decide whether a chunk may take it.

    .venv/bin/python bench/direct_path_micro.py [--chunks 200000]

Real objects throughout, no sockets: an `engines.upstream.http1` connection fed one HTTP
chunk (a 250-byte chat chunk as vLLM and the simulator send it) per call, the engine's
sink (`engines.upstream.engine._direct_sink`), the gateway's `RelayResponse.direct` and
`body_writer` on a uvicorn request cycle whose transport only counts what it is given.
Numbers are µs per chunk on one core, best of `--repeat` runs.

Owns this measurement only; through the whole gateway see bench/relay_ab.py and
bench/relay_split.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402
from uvicorn.protocols.http.flow_control import FlowControl  # noqa: E402
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle  # noqa: E402

from engines.base import GenerateRequest  # noqa: E402
from engines.upstream import http1  # noqa: E402
from engines.upstream.engine import _direct_sink  # noqa: E402
from engines.upstream.relay import plain_run  # noqa: E402
from engines.upstream.sse import SSEBuffer  # noqa: E402
from gateway.direct_body import body_writer  # noqa: E402
from gateway.streaming import RelayResponse, StreamObserver  # noqa: E402

EVENT = (
    b'data: {"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk",'
    b'"created":1700000000,"model":"sim-model","system_fingerprint":"gateway-sim",'
    b'"choices":[{"index":0,"delta":{"content":" hello"},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
)
PIECE = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


class NullTransport:
    """Takes writes and counts them; never paused, never closing."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def best_of(repeat: int, n: int, run: Callable[[], None]) -> float:
    """µs per call of the best of `repeat` timings of `run` (which makes `n` calls)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best / n * 1e6


def checks(n: int, repeat: int) -> None:
    def general() -> None:
        for _ in range(n):
            _ = EVENT.endswith(b"\n\n") and b"\r" not in EVENT and plain_run(EVENT)

    def one_event() -> None:
        for _ in range(n):
            _ = (
                EVENT.startswith(b"data: {")
                and EVENT.endswith(b"\n\n")
                and EVENT.find(b"\n", 0, -2) < 0
                and b"\r" not in EVENT
                and b'"error"' not in EVENT
                and b'"usage"' not in EVENT
            )

    print(f"checks, general (plain_run + CR):      {best_of(repeat, n, general):.3f} µs/chunk")
    print(f"checks, one plain event (the sink's):  {best_of(repeat, n, one_event):.3f} µs/chunk")


async def chain(n: int, repeat: int) -> None:
    loop = asyncio.get_running_loop()
    pool = http1.Pool("http://127.0.0.1:9")
    conn = http1._Conn(pool)
    upstream = NullTransport()
    conn.connection_made(upstream)  # type: ignore[arg-type]
    conn.send(b"GET / HTTP/1.1\r\n\r\n", True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    req = GenerateRequest("chat", {}, "m", None, "r", 0)
    conn.sink = _direct_sink(req, SSEBuffer())

    client = NullTransport()
    cycle = RequestResponseCycle(
        scope={"method": "POST"},  # type: ignore[typeddict-item]
        transport=client,  # type: ignore[arg-type]
        flow=FlowControl(client),  # type: ignore[arg-type]
        logger=logging.getLogger("bench"),
        access_logger=logging.getLogger("bench"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
    cycle.response_started = True
    cycle.chunked_encoding = True

    async def no_more() -> AsyncIterator[bytes]:
        yield b""

    relay = RelayResponse(
        b"", no_more(), want_usage=False, headers=[], observer=StreamObserver(), req=req
    )
    relay._write = body_writer(cycle.send)

    def feed() -> None:
        conn._waiter = loop.create_future()  # the relay waits with nothing pending
        for _ in range(n):
            conn.data_received(PIECE)

    taken: list[int] = [0]

    def stub(_: bytes) -> bool:
        taken[0] += 1
        return True

    req.direct = stub
    engine_side = best_of(repeat, n, feed)
    req.direct = relay.direct
    whole = best_of(repeat, n, feed)
    assert taken[0] == n * repeat and client.writes == n * repeat
    print(f"data_received -> engine sink (gateway side a stub):    {engine_side:.3f} µs/chunk")
    print(f"data_received -> sink -> RelayResponse.direct -> write: {whole:.3f} µs/chunk")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--chunks", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    checks(a.chunks, a.repeat)
    uvloop.run(chain(a.chunks, a.repeat))


if __name__ == "__main__":
    main()
