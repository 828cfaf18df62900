"""A minimal pipelined RESP2 client for the two hot-path Lua scripts (admit, settle).

Owns one TCP (or TLS) connection to Redis per process, on which every script call is
written at once and answered in order (Redis answers a connection's commands FIFO): a
future per call, a reply parser, a timeout per call. Not: anything but `EVALSHA`/`EVAL`
and the handshake (`AUTH` with an ACL user, `SELECT`, `ROLE` behind Sentinel); every
other command stays on redis-py (`gateway.state_store.redis`), and where Redis is and how
to reach it is `gateway.state_store.target`'s.

Measured reason (bench/keys_limiter.py, one request at a time, same run): redis-py's
asyncio client spent about 0.4 ms of the 0.53 ms p50 of one admission on command packing,
connection-pool checkout and reply parsing while the bare round trip (`redis-cli
--latency`) was 0.12 ms; this client brings the admission to the figures in
docs/benchmarks.md ("Key check + limiter add").

A call not answered within its timeout fails at once (`StoreUnavailable`), but its place
in the FIFO is kept, so the late reply is read and dropped and later calls still get their
own. A connection whose oldest call has waited longer than `STALL_S` (a black-holed Redis)
is dropped and every call on it fails; the next call connects again.

Behind Sentinel the address comes from a resolver (the sentinels' answer) on every new
connection, and the handshake checks with `ROLE` that the node is the primary. A reply
that says the node cannot take writes as a primary now (`READONLY`: it was demoted;
`NOREPLICAS`: it lost its replica, as an old primary does the moment its replica is
promoted when it runs with `min-replicas-to-write`) retires the connection: the calls
already on it still get their replies, the next call connects to the primary the
sentinels name then. That is how a failover is followed without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.state_store import StoreUnavailable
from gateway.state_store.target import RedisTarget

STALL_S = 2.0
CONNECT_TIMEOUT_S = 0.5
# Error replies of a node that cannot serve as the primary now: retire its connection.
NOT_PRIMARY = ("READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING")

Resolver = Callable[[], Awaitable[tuple[str, int]]]


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
        # (future, time sent) per call in flight, in the order Redis answers them.
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.closed = False
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        pending = self.pending
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
        if self.retired and not pending:
            self.client._drop(self, "retired")

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._drop(self, f"connection lost: {exc or 'closed by the server'}")


class RespClient:
    """Pipelined calls on one connection; every failure is `StoreUnavailable`."""

    def __init__(
        self, target: RedisTarget | str, timeout_s: float, resolve: Resolver | None = None
    ):
        target = RedisTarget(target) if isinstance(target, str) else target
        if not target.tcp:
            raise ValueError("only redis:// and rediss:// URLs are served by the RESP client")
        self.target = target
        self.username = target.user
        self.password = target.secret
        self.db = target.db
        self.ssl = target.ssl_context()
        # Sentinel: where the primary is now, asked on every new connection.
        self.resolve = resolve
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._retired: set[_Protocol] = set()
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _address(self) -> tuple[str, int]:
        if self.resolve is None:
            return self.target.host, self.target.port
        return await self.resolve()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        host, port = await self._address()
        tls: dict[str, Any] = {}
        if self.ssl is not None:
            # The name the certificate must carry (and SNI) is the host connected to.
            tls = {"ssl": self.ssl, "server_hostname": host}
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), host, port, **tls),
                max(self.timeout_s, CONNECT_TIMEOUT_S),
            )
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            raise StoreUnavailable(f"connect: {type(e).__name__}: {e}") from None
        self._proto = proto
        hello: list[bytes] = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            hello.append(encode("AUTH", *user, self.password))
        if self.db:
            hello.append(encode("SELECT", self.db))
        if self.resolve is not None:
            hello.append(encode("ROLE"))
        for cmd in hello:
            reply = await self._send(proto, cmd, max(self.timeout_s, CONNECT_TIMEOUT_S))
            if isinstance(reply, ReplyError):
                self._drop(proto, str(reply))
                raise StoreUnavailable(f"handshake: {reply}")
            if isinstance(reply, list) and reply and reply[0] != "master":
                # The sentinels have not seen the failover yet, or the node was demoted.
                self._drop(proto, f"{host}:{port} is a {reply[0]}, not the primary")
                raise StoreUnavailable(f"handshake: {host}:{port} is not the primary")
        return proto

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None:
            if proto.pending and time.monotonic() - proto.pending[0][1] > STALL_S:
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
        if proto.closed or proto.transport is None or proto.transport.is_closing():
            # e.g. a TLS server that refused our certificate after the handshake
            self._drop(proto, "connection closed")
            raise StoreUnavailable("connection closed by the server")
        fut: asyncio.Future[Any] = loop.create_future()
        proto.pending.append((fut, time.monotonic()))
        proto.transport.write(data)
        timer = loop.call_later(timeout, _expire, fut, timeout)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    async def call(self, data: bytes) -> Any:
        """Send one encoded command, return its reply (a `ReplyError` is returned)."""
        proto = await self._connection()
        reply = await self._send(proto, data, self.timeout_s)
        if isinstance(reply, ReplyError) and str(reply).startswith(NOT_PRIMARY):
            self._retire(proto)
        return reply

    def _retire(self, proto: _Protocol) -> None:
        """No new calls on this connection; closed once its calls in flight are answered
        (or after `STALL_S`): their replies are theirs, whatever the node is now."""
        if proto.retired or proto.closed:
            return
        proto.retired = True
        if proto is self._proto:
            self._proto = None
        if not proto.pending:
            self._drop(proto, "retired")
            return
        self._retired.add(proto)
        asyncio.get_running_loop().call_later(STALL_S, self._drop, proto, "retired, no reply")

    def _drop(self, proto: _Protocol, why: str) -> None:
        if proto.closed:
            return
        proto.closed = True
        self._retired.discard(proto)
        if proto is self._proto:
            self._proto = None
        pending, proto.pending = proto.pending, deque()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(StoreUnavailable(why))
        if proto.transport is not None:
            proto.transport.close()

    async def close(self) -> None:
        for proto in [*self._retired, *([self._proto] if self._proto else [])]:
            self._drop(proto, "closed")
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        await asyncio.sleep(0)  # the transport's close runs on the next loop turn


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(StoreUnavailable(f"no reply within {timeout * 1000:g} ms"))
