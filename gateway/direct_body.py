"""Writing a streamed response's body blocks straight onto uvicorn's connection.

Owns `body_writer(send)`: given the ASGI `send` of a request, a function that frames one
body block as an HTTP/1.1 chunk and writes it to the connection's transport — or None
when `send` is not uvicorn's httptools `send` (another server, or a middleware wrapping
`send`, such as CORS: then every message must go through it). The writer declines (returns
False) whenever uvicorn's own `send` has something to do besides framing and writing:
the client is not reading (write flow paused: `send` waits for the drain), the connection
is closing, the response is not chunked or already complete. The caller then sends the
block as an ASGI message, so backpressure and disconnects behave as before. The response
start and the last block always go through `send` (uvicorn's keep-alive and
request-complete bookkeeping live there).

Does not own: what the blocks contain, nor when the stream ends (`gateway.streaming`).

Why: the relay sends one block per upstream chunk, and uvicorn's `send` builds a
coroutine, a message dict and a list to join for each. Measured (one block of 260 bytes
onto a null transport, this box): uvicorn's `send` 1.28 µs, this writer 0.47 µs per block;
through the whole gateway see docs/benchmarks.md ("Stream relay: first cuts").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

BodyWriter = Callable[[bytes], bool]


def body_writer(send: Any) -> BodyWriter | None:
    """A direct writer for the body blocks of the response `send` belongs to (call it
    after `http.response.start` went through `send`), or None."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or cycle.scope.get("method") == "HEAD":
        return None
    transport = cycle.transport
    flow = cycle.flow

    def write(body: bytes) -> bool:
        if (
            flow.write_paused
            or cycle.chunked_encoding is not True
            or cycle.response_complete
            or transport.is_closing()
        ):
            return False
        if body:  # an empty chunk would end the chunked body
            transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    return write
