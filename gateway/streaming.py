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

from engines.base import EngineStream, ServingError, Usage
from gateway.direct_body import body_writer
from gateway.errors import error_event

log = logging.getLogger("gateway.streaming")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

DONE = b"data: [DONE]\n\n"


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

    A small task awaiting `receive()` instead of racing every await against it: nothing per
    chunk. With `delay`, the task is only created if the work is still running after that
    long, so a quick non-streamed request pays for a timer, not a task (the task was 4.5%
    of the gateway's CPU under load); a client leaving is then seen `delay` late at most.
    """

    __slots__ = ("_handle", "_receive", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive, delay: float = 0.0):
        self.disconnected = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
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

    def close(self) -> None:
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

    def tail(self, blocks: tuple[bytes | None, ...]) -> None:
        """The stream's last two blocks (where the finish reason is), once at the end."""

    def finished(
        self, usage: Usage | None, error: ServingError | None, disconnected: bool
    ) -> None: ...


class RelayResponse:
    """An ASGI response relaying an engine stream whose first block is already in hand."""

    __slots__ = ("_first", "_headers", "_observer", "_stream", "_want_usage")

    def __init__(
        self,
        first: bytes,
        stream: EngineStream,
        *,
        want_usage: bool,
        headers: list[tuple[bytes, bytes]],
        observer: StreamObserver,
    ):
        self._first = first
        self._stream = stream
        self._want_usage = want_usage
        self._headers = headers
        self._observer = observer

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        watch = DisconnectWatch(receive)
        usage: Usage | None = None
        error: ServingError | None = None
        want_usage = self._want_usage
        observer = self._observer
        tail, prev = self._first, None  # raw: the finish reason is in the last two
        events = 0
        # Gaps are noted here and handed over once at the end (`observe_many`):
        # prometheus-client's `observe` per chunk measured 3.2 µs, a list append and the
        # bulk observation 0.4 µs per gap (docs/benchmarks.md).
        gaps: list[float] = []
        note_gap = gaps.append
        write = body_writer(send)
        try:
            block, usage = take_usage(tail, want_usage)
            events = block.count(b"\n\n")
            if write is None or not write(block):
                await send({"type": "http.response.body", "body": block, "more_body": True})
            last = time.perf_counter()
            async for raw in self._stream:
                prev, tail = tail, raw
                now = time.perf_counter()
                note_gap(now - last)
                last = now
                events += raw.count(b"\n\n")
                block, found = take_usage(raw, want_usage)
                if found is not None:
                    usage = found
                    if not block:
                        continue
                if write is None or not write(block):
                    await send({"type": "http.response.body", "body": block, "more_body": True})
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
        except ServingError as exc:
            error = exc
            await self._end_with_error(send, exc)
        except Exception as exc:  # an engine bug must still end the stream cleanly
            log.exception("stream failed")
            error = ServingError(f"The engine failed: {type(exc).__name__}.")
            await self._end_with_error(send, error)
        finally:
            watch.close()
            await self._stream.aclose()
            if gaps:
                observer.gaps(gaps)
            if usage is None:
                observer.relayed(events)
            observer.tail((tail, prev))
            observer.finished(usage, error, watch.disconnected)

    @staticmethod
    async def _end_with_error(send: Send, exc: ServingError) -> None:
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": error_event(exc), "more_body": False})
