"""A minimal pooled HTTP/1.1 client for the upstream hop (asyncio or uvloop + httptools).

Owns: per-endpoint keep-alive connection pools (`Pool`: no limit on connections, idle ones
reused last-in-first-out and closed after `idle_timeout`), sending one pre-built request
(request line, headers and a `Content-Length` body, as bytes the caller built once), and
reading the answer: status, raw headers, a body delimited by Content-Length, chunked
transfer-encoding or the connection's close. Whole answers come from `Pool.fetch()`;
streamed ones from `Pool.stream()`, whose `Stream.read_chunk()` hands over the body bytes
as httptools delivers them (every piece received since the last call, joined once), pausing
the socket when the consumer lags. Failures are typed for the caller's retry policy:
`ConnectError` (no connection), `Disconnected` (closed or reset before any byte of the
answer: safe to send elsewhere; a pooled keep-alive connection that turns out to be stale is
retried once on a fresh one inside the pool), `ProtocolError` (malformed, or cut after some
bytes: never retried), `ConnectTimeout` / `ReadTimeout` / `FirstByteTimeout` (all
`TimeoutError`; the read timeout is the longest silence, the first-byte timeout of a stream
the wait for its first body bytes; both are checked by the one `loop.call_at` timer each
connection has, which data does not reset: data only stamps the time, the timer re-arms
itself lazily). A response not
read to its end (consumer gone, task cancelled, error) closes its connection, so the
upstream sees the disconnect at once; only complete keep-alive answers go back to the pool.

Does not: proxies, redirects, cookies, compression (it sends no Accept-Encoding), request
bodies other than bytes with Content-Length, pipelining, Expect/100-continue, upgrades,
HTTP/2. TLS is the event loop's: an `https://` pool passes an `ssl.SSLContext` (the default
verifying one unless given) to `create_connection`; nothing else differs.

Why hand-written: py-spy on the gateway (one core, 64 concurrent non-streamed requests to
the simulator) put ~28-30 % of its CPU inside aiohttp's client (request building, writer,
timeout objects, response handler, stream reader); this hop needs a tiny fraction of that
machinery. Measured here (client alone on one core, 64 concurrent non-streamed chat
requests to the simulator on the other, uvloop): aiohttp 3.14 ~60 us of CPU per request
and ~16,500 req/s, this client ~14 us and ~54,000 req/s (the simulator's limit). Through
the gateway the same change took throughput from 0.48 to 0.69 of direct (non-streamed, 64
concurrent) and from 0.62 to 0.86 (streamed, 64), with ~32 % less gateway CPU per request.
What is left of this module in a profile is mostly the `transport.write` system call.

Why one module of ~660 lines: the protocol object, the pool and the stream share private
per-connection state on the hot path (parser callbacks, the read-timeout stamp, pause /
resume); splitting them would put attribute lookups across modules on every chunk.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Disconnected",
    "FirstByteTimeout",
    "Pool",
    "ProtocolError",
    "ReadTimeout",
    "Response",
    "Stream",
    "header",
]

# A streamed body buffered beyond this (the consumer lags) pauses reading the socket.
_HIGH_WATER = 256 * 1024


class ConnectError(OSError):
    """No connection could be made (refused, unreachable, name not resolved)."""


class Disconnected(ConnectionError):
    """The server closed or reset the connection before sending any byte of the answer."""


class ProtocolError(Exception):
    """The answer is malformed, or the connection ended in the middle of it."""


class ConnectTimeout(TimeoutError):
    pass


class ReadTimeout(TimeoutError):
    pass


class FirstByteTimeout(TimeoutError):
    """A stream's first body bytes did not come in time (`Pool.stream(first_byte_s=)`)."""


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), compared case-insensitively."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


class Response:
    """A whole answer (`Pool.fetch`). Its connection is already back in the pool."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)


class _Conn(asyncio.Protocol):
    """One connection; it carries at most one request at a time. `seq` numbers its
    requests so that a late close from a finished request never hits the next one."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_error",
        "_parser",
        "_paused",
        "_pool",
        "_stream",
        "_timer",
        "_waiter",
        "busy",
        "closed",
        "complete",
        "first_by",
        "headers",
        "keep_alive",
        "last",
        "seq",
        "sink",
        "started",
        "status",
        "timer_at",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.last = 0.0
        # A stream's deadline for its first body bytes (0: none, or they came).
        self.first_by = 0.0
        self._stream = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._paused = False
        self.busy = False
        self.closed = False
        self.complete = False
        self.keep_alive = False
        self.started = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.seq = 0
        # A streamed body's consumer offered each piece while it waits for one (see
        # `Stream.set_sink`).
        self.sink: Callable[[bytes], bool] | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self._pool._conns.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.close()  # nothing was asked: a confused or hostile server
            return
        self.last = self._pool._time()
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"malformed HTTP response from {self._pool.origin}: {e}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pool = self._pool
        pool._conns.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.busy:
            if self in pool._idle:
                pool._idle.remove(self)
            return
        if self.complete or self._error is not None:
            return
        if exc is None and self.status and not self._length_known():
            # A body delimited by the connection's close: a clean close is its end.
            self.on_message_complete()
            return
        why = f": {exc!r}" if exc else ""
        if not self.started:
            self._fail(Disconnected(f"{pool.origin} closed the connection before answering{why}"))
        else:
            self._fail(ProtocolError(f"{pool.origin} closed the connection mid-response{why}"))

    # ---- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self._stream:
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.first_by:
            self.first_by = 0.0
        if self._stream:
            w = self._waiter
            if w is not None and not w.done():
                # The consumer waits with nothing pending: its sink may take the piece
                # here, and the consumer sleeps on (no wake-up for a piece passed on).
                sink = self.sink
                if sink is not None and sink(body):
                    return
                self._chunks.append(body)
                w.set_result(None)
            else:
                self._chunks.append(body)
                self._buffered += len(body)
                if self._buffered > _HIGH_WATER and not self._paused and self.transport:
                    self._paused = True
                    self.transport.pause_reading()
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.first_by = 0.0
        # Read it now: llhttp resets its flags once this callback returns.
        self.keep_alive = self._parser.should_keep_alive()
        w = self._waiter
        if self._stream:
            if w is not None and not w.done():
                w.set_result(None)
            return
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        resp = Response(self.status, self.headers, body)
        self._finish()
        if w is not None and not w.done():
            w.set_result(resp)

    # ---- requests

    def send(self, data: bytes, stream: bool, first_byte_s: float = 0.0) -> asyncio.Future[Any]:
        self.busy = True
        self.seq += 1
        self._stream = stream
        self.sink = None
        self.complete = self.started = False
        self.status = 0
        self.headers = []
        self._chunks = []
        self._buffered = 0
        pool = self._pool
        self.last = now = pool._time()
        deadline = now + pool.read_timeout
        if first_byte_s:
            # Usually no timer call: a pooled connection's timer (its idle deadline) fires
            # sooner and re-arms for whichever deadline is next.
            self.first_by = first_by = now + first_byte_s
            deadline = min(deadline, first_by)
        else:
            self.first_by = 0.0
        if self._timer is None:
            self._arm(deadline)
        elif self.timer_at > deadline:
            self._timer.cancel()
            self._arm(deadline)
        fut: asyncio.Future[Any] = pool._loop.create_future()
        self._waiter = fut
        assert self.transport is not None
        self.transport.write(data)
        return fut

    def abandon(self, seq: int) -> None:
        """The request numbered `seq` gave up (cancelled, consumer gone, failed): close the
        connection unless that request already finished and released it."""
        if self.seq == seq and self.busy:
            self.close()

    def _finish(self) -> None:
        """The answer is complete: back to the pool, or closed if the server wants that."""
        self._waiter = None
        if self.closed or not self.keep_alive:
            self.close()
            return
        pool = self._pool
        if pool.closed:
            self.close()
            return
        self.busy = False
        self.last = now = pool._time()
        deadline = now + pool.idle_timeout
        if self.timer_at > deadline and self._timer is not None:
            self._timer.cancel()
            self._arm(deadline)
        pool._idle.append(self)

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(err)
            # Retrieved by the awaiting request, or it was cancelled; never "never retrieved".
            w.exception()
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            pool = self._pool
            pool._conns.discard(self)
            if not self.busy and self in pool._idle:
                pool._idle.remove(self)
            t = self.transport
            if t is not None:
                t.abort() if abort else t.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _length_known(self) -> bool:
        framing = (b"content-length", b"transfer-encoding")
        return any(k.lower() in framing for k, _v in self.headers)

    # ---- the one timer: read timeout while busy, idle timeout while pooled

    def _arm(self, deadline: float) -> None:
        self.timer_at = deadline
        self._timer = self._pool._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        pool = self._pool
        now = pool._time()
        if self.busy:
            if self._paused or self.complete:
                self.last = now  # the consumer lags; the upstream is not silent
            deadline = self.last + pool.read_timeout
            first_by = self.first_by
            if first_by:
                if now >= first_by:
                    self._fail(FirstByteTimeout(f"{pool.origin} sent no body bytes in time"))
                    return
                deadline = min(deadline, first_by)
            if now >= deadline:
                self._fail(ReadTimeout(f"{pool.origin} sent nothing for {pool.read_timeout:g} s"))
                return
        else:
            deadline = self.last + pool.idle_timeout
            if now >= deadline:
                self.close()
                return
        self._arm(deadline)

    # ---- streamed bodies (through `Stream`)

    async def read_chunk(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = fut = self._pool._loop.create_future()
            await fut


async def _read_until_closed(
    c: _Conn, t: asyncio.Transport, within_s: float, parts: list[bytes]
) -> None:
    """`Stream.drain_abandoned`'s wait: shut the write side, then gather body pieces into
    `parts` until the worker closes, the body ends or `within_s` passes."""
    loop = c._pool._loop
    try:
        t.write_eof()
    except (OSError, RuntimeError, NotImplementedError):
        return
    if c._paused:
        c._paused = False
        t.resume_reading()
    end = loop.time() + within_s
    while not (c.closed or c.complete or c._error is not None):
        left = end - loop.time()
        if left <= 0:
            return
        c._waiter = fut = loop.create_future()
        timer = loop.call_later(left, _wake, fut)
        try:
            await fut
        except (ProtocolError, TimeoutError, OSError):
            return  # the worker's close ends a chunked body "mid-response"
        finally:
            timer.cancel()
            parts += c._chunks
            c._chunks = []
            c._buffered = 0
            if c._paused and not c.closed:
                c._paused = False
                t.resume_reading()


def _wake(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class Stream:
    """A streamed answer (`Pool.stream`): status and headers now, the body through
    `read_chunk()`. Call `release()` when done with it, whatever happened: a body read to
    its end returns the connection to the pool, anything else closes it."""

    __slots__ = ("_conn", "_seq", "headers", "read_chunk", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._seq = conn.seq
        self.status = conn.status
        self.headers = conn.headers
        # `read_chunk()`, awaitable: the body bytes received since the last call (waiting
        # for some if none), b"" at the end of the body. Raises ProtocolError or
        # ReadTimeout. The connection's own method, not a wrapper: it is called once per
        # streamed chunk.
        self.read_chunk: Callable[[], Awaitable[bytes]] = conn.read_chunk

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        parts = []
        while data := await self._conn.read_chunk():
            parts.append(data)
        return b"".join(parts)

    def set_sink(self, sink: Callable[[bytes], bool] | None) -> None:
        """Offer each body piece to `sink` as it arrives while `read_chunk()` waits with
        nothing pending; a piece it takes (True) is never returned by `read_chunk()`.
        Anything else (False, or pieces arriving while the consumer is busy) queues as
        usual, so `read_chunk()` keeps the order. The sink runs inside the protocol's
        `data_received`: it must not block, and what it raises breaks the connection."""
        if self._conn.seq == self._seq:
            self._conn.sink = sink

    async def drain_abandoned(self, within_s: float) -> bytes:
        """The body bytes the worker sent after the consumer gave up, for counting only:
        those already received, then whatever arrives once the write side is shut
        (a half-close the worker's server reads as the client's close: uvicorn's
        `eof_received` lets the transport close, so vLLM aborts, as seen on the GPU,
        docs/gpu.md; the simulator stops; Node's and Go's servers end a request on a read
        EOF by default, not tried here) until the worker closes, the body ends or
        `within_s` passes. The connection is closed after, never pooled.

        Why: a stream cut by its client is billed by what the worker sent for it; with a
        plain close the events in flight (on the wire, in the kernel's buffers) were lost
        to the count while the worker's counters had them (issue 25)."""
        c = self._conn
        if c.seq != self._seq or not c.busy:
            return b""
        c.sink = None
        parts = c._chunks
        c._chunks = []
        c._buffered = 0
        t = c.transport
        try:
            if not (c.closed or c.complete or c._error is not None) and t is not None:
                await _read_until_closed(c, t, within_s, parts)
        finally:
            c.close()  # never pooled: its write side is shut (also when cancelled here)
        return b"".join(parts)

    def release(self) -> None:
        c = self._conn
        if c.seq != self._seq or not c.busy:
            return
        c.sink = None
        if c.complete and c._error is None:
            c._finish()
        else:
            c.close()

    def close(self) -> None:
        self._conn.abandon(self._seq)


class Pool:
    """Keep-alive connections to one origin (scheme, host, port). `fetch()` and `stream()`
    send `data`, a whole request as bytes (see `request_head()` for its first part)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        idle_timeout: float = 30.0,
        ssl: ssl_mod.SSLContext | None = None,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl_mod.SSLContext | None = None
        if u.scheme == "https":
            self.ssl = ssl or ssl_mod.create_default_context()
        self.origin = f"{u.scheme}://{u.netloc.rpartition('@')[2]}"
        self.host_header = u.netloc.rpartition("@")[2]
        self.path_prefix = u.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._time = self._loop.time
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self.closed = False

    def request_head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The request line, Host and `headers` up to (not including) the headers that vary
        per request and the blank line: append e.g. `Content-Length: N\\r\\n\\r\\n` + body."""
        lines = [f"{method} {self.path_prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        for k, v in headers.items():
            if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
                raise ValueError(f"header {k!r} contains a line break")
            lines.append(f"{k}: {v}")
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._conns)

    async def _connect(self) -> _Conn:
        if self.closed:
            raise ConnectError(f"{self.origin}: pool closed")
        try:
            async with asyncio.timeout(self.connect_timeout):
                _t, conn = await self._loop.create_connection(
                    lambda: _Conn(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError as e:
            raise ConnectTimeout(
                f"connecting to {self.origin} took over {self.connect_timeout:g} s"
            ) from e
        except OSError as e:
            raise ConnectError(f"cannot connect to {self.origin}: {e}") from e
        return conn

    async def fetch(self, data: bytes) -> Response:
        """Send the request; the whole answer."""
        # The hot path, inlined: an idle connection (LIFO), one await.
        idle = self._idle
        if idle:
            conn = idle.pop()
            if not conn.closed:
                fut = conn.send(data, False)
                seq = conn.seq
                try:
                    return cast(Response, await fut)
                except Disconnected:
                    pass  # a keep-alive connection the server had closed: once more, fresh
                except BaseException:
                    conn.abandon(seq)
                    raise
        _conn, resp = await self._fresh(data, False)
        return cast(Response, resp)

    async def stream(self, data: bytes, first_byte_s: float = 0.0) -> Stream:
        """Send the request; return once the status and headers are in. With
        `first_byte_s`, the connection fails with `FirstByteTimeout` (from this call or
        the first `read_chunk()`) unless body bytes come within that many seconds."""
        idle = self._idle
        if idle:
            conn = idle.pop()
            if not conn.closed:
                fut = conn.send(data, True, first_byte_s)
                seq = conn.seq
                try:
                    await fut
                    return Stream(conn)
                except Disconnected:
                    pass
                except BaseException:
                    conn.abandon(seq)
                    raise
        conn, _ = await self._fresh(data, True, first_byte_s)
        return Stream(conn)

    async def _fresh(
        self, data: bytes, stream: bool, first_byte_s: float = 0.0
    ) -> tuple[_Conn, Any]:
        """Send on a new connection: no pool to fall back on, so `Disconnected` is the
        caller's to handle (another endpoint)."""
        conn = await self._connect()
        fut = conn.send(data, stream, first_byte_s)
        seq = conn.seq
        try:
            return conn, await fut
        except BaseException:
            conn.abandon(seq)
            raise

    def fail_busy(self, err: BaseException) -> None:
        """Fail every request in flight with `err` (a wedged server); idle connections
        stay."""
        for conn in list(self._conns):
            if conn.busy:
                conn._fail(err)

    def close(self) -> None:
        """Close every connection, idle or busy (busy requests fail with ProtocolError or
        Disconnected)."""
        self.closed = True
        self._idle.clear()
        for conn in list(self._conns):
            if conn.busy:
                conn._fail(Disconnected(f"{self.origin}: pool closed"))
            else:
                conn.close()
