"""The SSE relay from an engine stream to the client, and cancel-on-disconnect.

Hand-written rather than sse-starlette's EventSourceResponse because this is the hot path:
engine blocks are already framed SSE bytes, so the relay sends them as they are (no
re-serialising), looks into a block only when it mentions `"usage"` (to count tokens and
drop the usage chunk the client did not ask for), ends with `data: [DONE]`, or with an
OpenAI error event and no `[DONE]` when the stream fails after its first byte. A watcher
on the ASGI `receive` channel cancels the relay the moment the client disconnects, which
closes the engine stream (`aclose`) and so stops the work upstream.

Owns: framing the end of a stream, usage extraction, TTFT/ITL observation points,
disconnect handling. Not: what a chunk contains (engines) nor metrics declarations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from engines.base import EngineStream, GenerateRequest, ServingError, Usage
from gateway.direct_body import BodyWriter, body_writer, disconnect_notice, start_stream
from gateway.errors import error_event

log = logging.getLogger("gateway.streaming")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

DONE = b"data: [DONE]\n\n"
# What a stream keeps of what it relayed, for an exact count of a stream cut before its
# usage (`StreamObserver.streamed`): 8 MiB is ~50,000 tokens of chunks.
KEEP_BYTES = 8 << 20


def take_usage(block: bytes, keep_usage_chunk: bool) -> tuple[bytes, Usage | None]:
    """The usage of the last event in `block` that carries one; that event is dropped
    when it is a usage-only chunk the client did not ask for. Only that event is parsed:
    a block can hold a whole short response."""
    pos = block.rfind(b'"usage":{')
    if pos < 0:
        pos = block.rfind(b'"usage": {')
        if pos < 0:
            return block, None
    start = block.rfind(b"\n\n", 0, pos)
    start = 0 if start < 0 else start + 2
    end = block.find(b"\n\n", pos)
    end = len(block) if end < 0 else end + 2
    event = block[start:end]
    if not event.startswith(b"data: {"):
        return block, None
    try:
        obj = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return block, None
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return block, None
    usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    if not keep_usage_chunk and not obj.get("choices"):
        return block[:start] + block[end:], usage
    return block, usage


class DisconnectWatch:
    """Cancels the current task when the client goes away.

    Given uvicorn's `send` on the gateway's protocol, the connection itself says so
    (`gateway.direct_body.disconnect_notice`): no task, no timer. Otherwise a small task
    awaiting `receive()` instead of racing every await against it: nothing per chunk. With
    `delay`, that task is only created if the work is still running after that long, so a
    quick non-streamed request pays for a timer, not a task (the task was 4.5% of the
    gateway's CPU under load); a client leaving is then seen `delay` late at most.
    """

    __slots__ = ("_handle", "_receive", "_task", "_watcher", "_withdraw", "disconnected")

    def __init__(self, receive: Receive, delay: float = 0.0, send: Send | None = None):
        self.disconnected = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._withdraw = disconnect_notice(send, self._gone) if send is not None else None
        if self._withdraw is not None:
            return
        if delay > 0:
            self._handle = asyncio.get_running_loop().call_later(delay, self._arm)
        else:
            self._arm()

    def _arm(self) -> None:
        self._handle = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._task.cancel()
                return

    def now(self) -> None:
        """Watch from now on: a watcher task still waiting for its delay starts at once."""
        if self._handle is not None:
            self._handle.cancel()
            self._arm()

    def _gone(self) -> None:
        self.disconnected = True
        self._task.cancel()

    def close(self) -> None:
        if self._withdraw is not None:
            self._withdraw()
        if self._handle is not None:
            self._handle.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True if it was ours (the client left) and is handled."""
        if self.disconnected:
            self._task.uncancel()
            return True
        return False


class StreamObserver:
    """What the relay reports back: first chunk, gaps between chunks, usage, outcome."""

    def first_chunk(self, at: float) -> None: ...
    def gaps(self, gaps: list[float]) -> None:
        """The gaps between the stream's chunks, in seconds, once at the end."""

    def relayed(self, events: int) -> None:
        """SSE events relayed (a stream cut before its usage chunk is billed by them)."""

    def paths(self, direct: int, loop: int) -> None:
        """Blocks written by the engine's direct path and by the relay loop, once at the
        end."""

    def streamed(self, blocks: list[bytes] | None) -> None:
        """Every block relayed, once at the end of a stream that carried no usage (None
        past `KEEP_BYTES`): what the client was sent, to count its tokens exactly."""

    def tail(self, blocks: tuple[bytes | None, ...]) -> None:
        """The stream's last two blocks (where the finish reason is), once at the end."""

    def finished(
        self, usage: Usage | None, error: ServingError | None, disconnected: bool
    ) -> None: ...


class RelayResponse:
    """An ASGI response relaying an engine stream whose first block is already in hand.

    Plain events may also arrive through `direct` (set as the request's
    `GenerateRequest.direct`, `engines.base`: whole events, no usage in them): the engine calls
    it from its upstream connection's callback, and it writes the event straight to the
    client with the same bookkeeping as the loop (gap, event count, last two blocks). It
    declines whatever the direct writer declines (the client not reading, the connection
    closing): the engine then yields that event to the loop, which sends it through
    uvicorn's `send` and so waits for the client."""

    __slots__ = (
        "_direct",
        "_direct_events",
        "_events",
        "_first",
        "_gaps",
        "_headers",
        "_kept",
        "_last",
        "_observer",
        "_prev",
        "_req",
        "_sent",
        "_stream",
        "_tail",
        "_want_usage",
        "_watch",
        "_write",
    )

    def __init__(
        self,
        first: bytes,
        stream: EngineStream,
        *,
        want_usage: bool,
        headers: list[tuple[bytes, bytes]],
        observer: StreamObserver,
        req: GenerateRequest | None = None,
        watch: DisconnectWatch | None = None,
    ):
        self._first = first
        self._stream = stream
        self._want_usage = want_usage
        self._headers = headers
        self._observer = observer
        self._req = req
        # The request's watch, handed over by the route (else the relay makes its own).
        self._watch = watch
        self._write: BodyWriter | None = None
        self._events = 0
        self._direct = 0  # blocks written by the direct path
        self._direct_events = 0
        # Gaps are noted here and handed over once at the end (`observe_many`):
        # prometheus-client's `observe` per chunk measured 3.2 µs, a list append and the
        # bulk observation 0.4 µs per gap (docs/benchmarks.md).
        self._gaps: list[float] = []
        self._last = 0.0
        # raw: the finish reason is in the last two blocks
        self._tail: bytes | None = first
        # Every block relayed, for an exact count should the stream end without usage
        # (only when a key's ledger bills it: the request then has a `tail`,
        # `engines.base.GenerateRequest`); None once past KEEP_BYTES (the count is then
        # estimated), and None when nothing bills the stream.
        billed = req is not None and req.tail is not None
        self._sent: list[bytes] | None = [first] if billed else None
        self._kept = len(first)
        self._prev: bytes | None = None

    def _note(self, block: bytes) -> None:
        """What the relay keeps of every block it relays, by either path: the gap since
        the last one, the last two blocks, and the blocks themselves (up to KEEP_BYTES)."""
        now = time.perf_counter()
        self._gaps.append(now - self._last)
        self._last = now
        self._prev, self._tail = self._tail, block
        sent = self._sent
        if sent is not None:
            sent.append(block)
            self._kept += len(block)
            if self._kept > KEEP_BYTES:
                self._sent = None

    def direct(self, event: bytes) -> bool:
        write = self._write
        if write is None or not write(event):
            return False
        self._note(event)
        self._direct += 1
        # A block may hold several events (one upstream read); the common one holds one.
        self._direct_events += event.count(b"\n\n")
        return True

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        watch = self._watch
        if watch is None:
            watch = DisconnectWatch(receive, send=send)
        else:
            watch.now()
        usage: Usage | None = None
        error: ServingError | None = None
        want_usage = self._want_usage
        observer = self._observer
        req = self._req
        self._write = write = body_writer(send)
        loop = 1  # the first block
        # The usage chunk (the last one by the engine contract) waits to go out with
        # `[DONE]` in the final write: one system call per stream less.
        held = b""
        try:
            block, usage = take_usage(self._first, want_usage)
            self._events = block.count(b"\n\n")
            if not start_stream(send, self._headers, block):
                await send({"type": "http.response.start", "status": 200, "headers": self._headers})
                if write is None or not write(block):
                    await send({"type": "http.response.body", "body": block, "more_body": True})
            self._last = time.perf_counter()
            if req is not None and write is not None:
                req.direct = self.direct
            async for raw in self._stream:
                loop += 1
                self._note(raw)
                self._events += raw.count(b"\n\n")
                block, found = take_usage(raw, want_usage)
                if held:  # something after the usage chunk: keep the order
                    block, held = held + block, b""
                if found is not None:
                    usage = found
                    if block:
                        held = block
                        if req is not None:
                            req.direct = None  # nothing may overtake it
                    continue
                if write is None or not write(block):
                    await send({"type": "http.response.body", "body": block, "more_body": True})
            await send({"type": "http.response.body", "body": held + DONE, "more_body": False})
            held = b""
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
        except ServingError as exc:
            error = exc
            await self._end_with_error(send, exc, held)
        except Exception as exc:  # an engine bug must still end the stream cleanly
            log.exception("stream failed")
            error = ServingError(f"The engine failed: {type(exc).__name__}.")
            await self._end_with_error(send, error, held)
        finally:
            if req is not None:
                req.direct = None  # nothing more goes to this client from the engine
            watch.close()
            await self._stream.aclose()
            if self._gaps:
                observer.gaps(self._gaps)
            if usage is None:
                observer.relayed(self._events + self._direct_events)
            if usage is None:
                observer.streamed(self._sent)
            observer.tail((self._tail, self._prev))
            observer.paths(self._direct, loop)
            observer.finished(usage, error, watch.disconnected)

    @staticmethod
    async def _end_with_error(send: Send, exc: ServingError, held: bytes = b"") -> None:
        with contextlib.suppress(OSError):
            body = held + error_event(exc)
            await send({"type": "http.response.body", "body": body, "more_body": False})
