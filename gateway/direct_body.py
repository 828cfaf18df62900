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

Owns `whole_response` and `start_stream`: a non-streamed answer, or a stream's head and
first block, in one write instead of uvicorn's two (each function says why).

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

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

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


def _cycle_for_start(send: Any) -> RequestResponseCycle | None:
    """uvicorn's cycle behind `send` when a response may start by a direct write: nothing
    sent yet, not HEAD, client still there, uvicorn's own access log off (it logs in
    `send`)."""
    cycle = getattr(send, "__self__", None)
    if (
        type(cycle) is not RequestResponseCycle
        or cycle.response_started
        or cycle.disconnected
        or cycle.access_log
        or cycle.scope.get("method") == "HEAD"
        or cycle.transport.is_closing()
    ):
        return None
    return cycle


def _head(
    cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]]
) -> list[bytes]:
    """The status line and header lines as uvicorn's `send` writes them (its default
    headers first; `connection: close` when the connection will not be kept)."""
    parts = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        parts += (name, b": ", value, b"\r\n")
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    return parts


def whole_response(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    """Write a whole response (the given headers, which must be the gateway's own — no
    content-length, nothing a client wrote unchecked — then `body`) to the connection in
    one write, and complete uvicorn's cycle as its `send` would. False, having done
    nothing, where `send` must do it (see `_cycle_for_start`).

    Why: uvicorn's `send` writes the head and the body as two writes (two system calls)
    after checking every header against two regular expressions; a non-streamed answer
    is one write here (docs/benchmarks.md, "The front door in one pass")."""
    cycle = _cycle_for_start(send)
    if cycle is None:
        return False
    parts = _head(cycle, status, headers)
    parts += (b"content-length: %d\r\n\r\n" % len(body), body)
    cycle.chunked_encoding = False
    cycle.expected_content_length = 0
    cycle.transport.write(b"".join(parts))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


def start_stream(send: Any, headers: list[tuple[bytes, bytes]], first: bytes) -> bool:
    """Start a chunked 200 response and write its first body block in the same write.
    False, having done nothing, where `send` must start it (see `_cycle_for_start`).
    Why: one system call per stream less than `send`'s start and then the block."""
    cycle = _cycle_for_start(send)
    if cycle is None:
        return False
    parts = _head(cycle, 200, headers)
    parts.append(b"transfer-encoding: chunked\r\n\r\n")
    cycle.chunked_encoding = True
    cycle.expected_content_length = 0
    if first:
        parts += (b"%x\r\n" % len(first), first, b"\r\n")
    cycle.transport.write(b"".join(parts))
    return True


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
