"""One upstream attempt of a streamed request: the relay of one worker's answer, and how it
ended.

Owns, for one attempt: sending it (through the engine's `open`, on first use), splitting the
worker's reads into runs of whole events (`engines.upstream.sse.SSEBuffer`), relaying each
run — a plain run as the very bytes received (`relay.plain_run`; or, while the gateway has a
direct path, from the connection's protocol callback through the engine's sink), any other
run (or every run when `slow`) through the caller's `rewrite` (`relay.process_run`, or a
continuation's) — and classifying how the attempt ended: `[DONE]`; an upstream error event
(its ServingError, raised after the events before it); a stall past `read_timeout_s`
(EngineTimeout), a broken connection or an end before `[DONE]` (UpstreamError), the last
three counted toward the worker's ejection (`failed`). The connection goes back to the
pool only after a whole body; anything else (consumer gone, worker broken, an error event)
closes it, so the worker sees the disconnect and stops generating.

Used by the engine's stream (`OpenAIEngine.stream`: one attempt) and by continuation
(`engines.upstream.continuation`: one per attempt). Does not own picking, sending or
retries before the first byte (`engines.upstream.send`), what a failure leads to (the
engine lets it end the stream; continuation may go on from another worker), nor the
engine's direct-path sink (`engines.upstream.engine`).

Why the loop is written out rather than layered: it runs once per upstream read on the
streaming hot path (docs/benchmarks.md); a run on the fast path costs a `feed`, one
`plain_run` check and the yield.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from engines.base import EngineTimeout, ServingError, UpstreamError
from engines.upstream import http1
from engines.upstream.endpoints import Endpoint
from engines.upstream.relay import ErrorOf, plain_run
from engines.upstream.sse import SSEBuffer

__all__ = ["Attempt", "Rewrite"]

log = logging.getLogger("engines.upstream")

# A run as the client gets it, whether `[DONE]` was in it, and the error an error event
# in it stands for (`relay.process_run`'s answer).
Rewrite = Callable[[bytes], tuple[bytes, bool, ServingError | None]]
# The connection's sink for one stream, made from the attempt's buffer (the engine's).
Sink = Callable[[SSEBuffer], Callable[[bytes], bool]]
Opened = tuple[Endpoint, Any, bytes]

# How long a stream its consumer left is still read, write side shut, for the events the
# worker sent before it saw the close (a loopback worker closes within a millisecond or
# two; one that ignores the half-close is cut here).
ABANDON_DRAIN_S = 1.0


class Attempt:
    """One attempt: `open()` sends it (or `relay` does, on first use); `relay` yields what
    the client gets and raises what ended it, other than `[DONE]`. `ep` is the worker once
    sent (None: no worker answered)."""

    __slots__ = ("_data", "_failed", "_open", "_resp", "ep", "error_of", "model", "request_id")

    def __init__(
        self,
        open_: Callable[[], Awaitable[Opened]],
        failed: Callable[[Endpoint, str], None],
        error_of: ErrorOf,
        model: str,
        request_id: str,
    ) -> None:
        self._open = open_
        self._failed = failed
        self.error_of = error_of
        self.model = model
        self.request_id = request_id
        self.ep: Endpoint | None = None
        self._resp: Any = None
        self._data = b""

    async def open(self) -> Endpoint:
        """Send the attempt (`engines.upstream.send`: retries before the first byte); the
        worker that answered."""
        ep, self._resp, self._data = await self._open()
        self.ep = ep
        return ep

    def _broke(self, ep: Endpoint, why: str, error: ServingError) -> ServingError:
        self._failed(ep, why)
        log.warning("request %s: upstream %s %s", self.request_id, ep.url, why)
        return error

    async def relay(
        self,
        rewrite: Rewrite,
        slow: bool,
        sink: Sink | None = None,
        keep: list[bytes] | None = None,
        tail: list[bytes] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The attempt's runs as the client gets them: plain runs as received, the others
        (every run when `slow`) through `rewrite`. `sink`: the gateway's direct path, for
        a stream that is not `slow`. `keep`: every run yielded is also appended there
        (continuation parses them after a failure). `tail`: should the consumer give up
        mid-stream, the whole events the worker had sent that it never took are appended
        there (`http1.Stream.drain_abandoned`), for the ledger's count."""
        if self.ep is None:
            await self.open()
        ep, resp, data = self.ep, self._resp, self._data
        assert ep is not None
        self._data = b""
        buf = SSEBuffer()
        abandoned = False
        try:
            read = resp.read_chunk
            if sink is not None and not slow:
                resp.set_sink(sink(buf))
            done = False
            while data:
                run = buf.feed(data)
                if run:
                    # The fast path: the run is relayed as received. Everything unusual
                    # (the final [DONE], an error event, comments, non-`data: ` lines) goes
                    # slow.
                    if slow or not plain_run(run):
                        run, seen_done, error = rewrite(run)
                        done = done or seen_done
                        if run:
                            if keep is not None:
                                keep.append(run)
                            yield run
                        if error is not None:
                            raise error
                    else:
                        if keep is not None:
                            keep.append(run)
                        yield run
                try:
                    data = await read()
                except TimeoutError as e:
                    why = "stalled mid-stream"
                    raise self._broke(
                        ep, why, EngineTimeout(f"model {self.model!r}: a worker {why}")
                    ) from e
                except http1.ProtocolError as e:
                    raise self._broke(
                        ep,
                        f"broke the stream: {e}",
                        UpstreamError(f"model {self.model!r}: a worker broke the stream"),
                    ) from e
            if not done:
                why = "ended the stream before [DONE]"
                raise self._broke(ep, why, UpstreamError(f"model {self.model!r}: a worker {why}"))
        except (GeneratorExit, asyncio.CancelledError):
            abandoned = True  # the consumer left (closed us, or its task was cancelled)
            raise
        finally:
            ep.outstanding -= 1
            if abandoned and tail is not None:
                # The connection is closed after, whatever happens (a cancel included).
                rest = buf.feed(await resp.drain_abandoned(ABANDON_DRAIN_S))
                if rest:
                    tail.append(rest)
            # A body read to its end returns the connection to the pool; anything else
            # closes it, so the upstream sees the disconnect and stops generating.
            resp.release()
