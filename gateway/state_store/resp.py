"""A minimal pipelined RESP2 client for the two hot-path Lua scripts (admit, settle).

Owns one TCP connection to Redis per process, on which every script call is written at
once and answered in order (Redis answers a connection's commands FIFO): a future per
call, a reply parser, a timeout per call. Not: anything but `EVALSHA`/`EVAL` and the
handshake (`AUTH`, `SELECT`); every other command stays on redis-py
(`gateway.state_store.redis`).

Measured reason (bench/keys_limiter.py, one request at a time, same run): redis-py's
asyncio client spent about 0.4 ms of the 0.53 ms p50 of one admission on command packing,
connection-pool checkout and reply parsing while the bare round trip (`redis-cli
--latency`) was 0.12 ms; this client brings the admission to the figures in
docs/benchmarks.md ("Key check + limiter add").

A call not answered within its timeout fails at once (`StoreUnavailable`), but its place
in the FIFO is kept, so the late reply is read and dropped and later calls still get their
own. A connection whose oldest call has waited longer than `STALL_S` (a black-holed Redis)
is dropped and every call on it fails; the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

from gateway.state_store import StoreUnavailable

STALL_S = 2.0
CONNECT_TIMEOUT_S = 0.5


class ReplyError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT)."""


def encode(*args: bytes | str | int | float) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


_INCOMPLETE = object()


def parse(buf: bytearray | bytes, pos: int) -> tuple[Any, int]:
    """One reply from buf[pos:]: (value, next position), or (_INCOMPLETE, pos)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind == 43:  # +
        return line.decode(), nxt
    if kind == 45:  # -
        return ReplyError(line.decode()), nxt
    if kind == 58:  # :
        return int(line), nxt
    if kind == 36:  # $
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[nxt : nxt + n]).decode(), nxt + n + 2
    if kind == 42:  # *
        n = int(line)
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            item, nxt = parse(buf, nxt)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, nxt
    raise ValueError(f"unexpected RESP type byte {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient):
        self.client = client
        self.buf = bytearray()
        # asyncio's or uvloop's (which does not subclass asyncio.Transport).
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        pending = self.client._pending
        try:
            while pos < len(buf):
                value, nxt = parse(buf, pos)
                if value is _INCOMPLETE:
                    break
                pos = nxt
                if not pending:
                    raise ValueError("a reply with no call waiting for it")
                fut = pending.popleft()[0]
                if not fut.done():  # a timed-out call's late reply is dropped
                    fut.set_result(value)
        except ValueError as e:
            self.client._drop(self, f"protocol error: {e}")
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._drop(self, f"connection lost: {exc or 'closed by the server'}")


class RespClient:
    """Pipelined calls on one connection; every failure is `StoreUnavailable`."""

    def __init__(self, url: str, timeout_s: float):
        u = urlparse(url)
        if u.scheme != "redis":
            raise ValueError("only redis:// URLs (TCP, no TLS) are served by the RESP client")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        self.db = int((u.path or "/0").strip("/") or 0)
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        # (future, time sent) per call in flight, in the order Redis answers them.
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.host, self.port),
                max(self.timeout_s, CONNECT_TIMEOUT_S),
            )
        except (OSError, TimeoutError) as e:
            raise StoreUnavailable(f"connect: {type(e).__name__}: {e}") from None
        self._proto = proto
        hello: list[bytes] = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            hello.append(encode("AUTH", *user, self.password))
        if self.db:
            hello.append(encode("SELECT", self.db))
        for cmd in hello:
            reply = await self._send(proto, cmd, max(self.timeout_s, CONNECT_TIMEOUT_S))
            if isinstance(reply, ReplyError):
                self._drop(proto, str(reply))
                raise StoreUnavailable(f"handshake: {reply}")
        return proto

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None:
            if self._pending and time.monotonic() - self._pending[0][1] > STALL_S:
                self._drop(proto, f"no reply for {STALL_S:g} s")
            else:
                return proto
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not fut.cancelled():
            fut.exception()  # retrieved: the callers got it

    def _send(self, proto: _Protocol, data: bytes, timeout: float) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fut, time.monotonic()))
        assert proto.transport is not None
        proto.transport.write(data)
        timer = loop.call_later(timeout, _expire, fut, timeout)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    async def call(self, data: bytes) -> Any:
        """Send one encoded command, return its reply (a `ReplyError` is returned)."""
        proto = await self._connection()
        return await self._send(proto, data, self.timeout_s)

    def _drop(self, proto: _Protocol, why: str) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        pending, self._pending = self._pending, deque()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(StoreUnavailable(why))
        if proto.transport is not None:
            proto.transport.close()

    async def close(self) -> None:
        if self._proto is not None:
            self._drop(self._proto, "closed")
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        await asyncio.sleep(0)  # the transport's close runs on the next loop turn


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(StoreUnavailable(f"no reply within {timeout * 1000:g} ms"))
