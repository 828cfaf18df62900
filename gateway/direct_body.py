"""The app's direct line to uvicorn's connection: writing a streamed response's body
blocks straight onto it, and being told at once when its client goes away.

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

Owns `disconnect_notice(send, callback)`: `callback` is called from the connection's
`connection_lost` when the client leaves before the response is complete (the protocol
calls `notify_disconnect`), or None where the server cannot (not the gateway's guarded
protocol, or already gone): the caller then watches `receive` with a task.
Why: that task (its creation, uvicorn's `receive` waiting on an Event, and its
cancellation at the end) was ~7 % of the gateway's py-spy samples relaying 256 streams of
2 tokens; with 32-token streams `bench/relay_ab.py` (c=256) measured 0.98 of the CPU with
the notice. The notice costs an attribute store per request.

Does not own: what the blocks contain, nor when the stream ends (`gateway.streaming`).

Why: the relay sends one block per upstream chunk, and uvicorn's `send` builds a
coroutine, a message dict and a list to join for each. Measured (one block of 260 bytes
onto a null transport, this box): uvicorn's `send` 1.28 µs, this writer 0.47 µs per block;
through the whole gateway see docs/benchmarks.md ("Stream relay: first cuts").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
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


# The attribute of uvicorn's request cycle holding the callback (the class has no slots).
_NOTICE = "gateway_on_disconnect"


def disconnect_notice(send: Any, callback: Callable[[], None]) -> Callable[[], None] | None:
    """Have `callback` called once if the client of the request `send` belongs to goes
    away before the response is complete; the function returned withdraws it. None when
    the server cannot tell (then watch `receive`)."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or cycle.disconnected:
        return None
    protocol = getattr(cycle.on_response, "__self__", None)
    if not getattr(protocol, "notifies_disconnect", False):
        return None
    setattr(cycle, _NOTICE, callback)
    return partial(setattr, cycle, _NOTICE, None)


def notify_disconnect(cycle: Any) -> None:
    """From a protocol's `connection_lost`: the cycle's client is gone."""
    callback = getattr(cycle, _NOTICE, None)
    if callback is not None and cycle.disconnected:
        setattr(cycle, _NOTICE, None)
        callback()
