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
from gateway.errors import error_event

log = logging.getLogger("gateway.streaming")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

DONE = b"data: [DONE]\n\n"
def has_usage(block: bytes) -> bool:
    """A usage object (not `"usage": null`, which some engines put in every chunk)."""
    return b'"usage":{' in block or b'"usage": {' in block


def take_usage(block: bytes, keep_usage_chunk: bool) -> tuple[bytes, Usage | None]:
    """Find the usage in a block of SSE events; drop usage-only chunks unless asked for."""
    usage: Usage | None = None
    kept: list[bytes] = []
    changed = False
    for event in block.split(b"\n\n"):
        if not event:
            continue
        if has_usage(event) and event.startswith(b"data: {"):
            try:
                obj = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                kept.append(event)
                continue
            u = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(u, dict):
                usage = Usage(int(u.get("prompt_tokens") or 0),
                              int(u.get("completion_tokens") or 0))
                if not keep_usage_chunk and not obj.get("choices"):
                    changed = True
                    continue
        kept.append(event)
    if not changed:
        return block, usage
    return b"".join(e + b"\n\n" for e in kept), usage


class DisconnectWatch:
    """Cancels the current task when the client goes away.

    One small task per request instead of racing every await against `receive()`:
    the request path pays a task creation, and nothing per chunk.
    """

    __slots__ = ("_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive):
        self.disconnected = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._task.cancel()
                return

    def close(self) -> None:
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
    def chunk(self, gap: float) -> None: ...
    def finished(self, usage: Usage | None, error: ServingError | None,
                 disconnected: bool) -> None: ...


class RelayResponse:
    """An ASGI response relaying an engine stream whose first block is already in hand."""

    __slots__ = ("_first", "_headers", "_observer", "_stream", "_want_usage")

    def __init__(self, first: bytes, stream: EngineStream, *, want_usage: bool,
                 headers: list[tuple[bytes, bytes]], observer: StreamObserver):
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
        try:
            block = self._first
            if has_usage(block):
                block, usage = take_usage(block, want_usage)
            await send({"type": "http.response.body", "body": block, "more_body": True})
            last = time.perf_counter()
            async for block in self._stream:
                now = time.perf_counter()
                observer.chunk(now - last)
                last = now
                if has_usage(block):
                    block, found = take_usage(block, want_usage)
                    usage = found or usage
                    if not block:
                        continue
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
            await self._stream.aclose()  # type: ignore[attr-defined]
            observer.finished(usage, error, watch.disconnected)

    @staticmethod
    async def _end_with_error(send: Send, exc: ServingError) -> None:
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": error_event(exc),
                        "more_body": False})
