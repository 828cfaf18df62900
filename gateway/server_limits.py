"""Limits on how clients may hold the server: time to send headers and body, header
size, connections per client address and in total, keep-alive idle time.

Owns `GuardedHttpToolsProtocol` (uvicorn's httptools protocol with those limits) and
`uvicorn_config`, which every way of serving the app uses (`gateway serve`, the tests'
`ServerThread`). It does not bound what a request says (`gateway.bounds`,
`gateway.protocol`) nor its body size (`gateway.api.common.read_json`).

Why a protocol subclass: uvicorn's httptools protocol has no header-read or body-read
timeout and no header size limit (its h11 protocol's size limit does not apply), so a
slow client holds a connection forever; these are connection-level events no ASGI
middleware sees. Cost on the hot path: per request a few attribute stores and
comparisons in `data_received` and `on_headers_complete` (the only per-request overrides;
no clock read, no timer — one sweeper per server wakes a few times per header timeout and
checks every connection). Measured, `bench/guard_overhead.py --micro --rounds 80` (the
protocols alone, paired rounds of CPU time): guarded/plain 1.021 and 1.030 in two runs,
about 1.5 µs of ~48 µs per request; a first version that overrode four more callbacks and
read the clock per request measured 1.06-1.08 and was reworked. End to end through the
gateway (`bench/guard_overhead.py --rounds 6 --seconds 3`, 2 cores shared with other
work) the ratios scatter 0.84-1.31: no difference visible above that noise.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from typing import Any, ClassVar

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.direct_body import notify_disconnect
from gateway.settings import Settings

log = logging.getLogger("gateway.server")

# Where a connection is in reading its current request.
_IDLE, _HEAD, _BODY, _APP = 0, 1, 2, 3


def _raw_response(status: int, message: str, error_type: str = "invalid_request_error") -> bytes:
    body = orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    )
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


HEADERS_TOO_LARGE = _raw_response(431, "The request headers are too large.")
HEADER_TIMEOUT = _raw_response(408, "The request headers took too long to arrive.")
BODY_TIMEOUT = _raw_response(408, "The request body took too long to arrive.")
TOO_MANY_FROM_CLIENT = _raw_response(
    429, "Too many open connections from your address.", "rate_limit_error"
)
TOO_MANY_CONNECTIONS = _raw_response(
    503, "The server has too many open connections; try again shortly.", "overloaded_error"
)


_base_headers_complete = HttpToolsProtocol.on_headers_complete


class _HeadersTooLarge(Exception):
    pass


class ConnectionGuard:
    """The limits and the live connections of one server, and the sweeper that ends
    connections past their deadlines (one timer for all, not one per request)."""

    def __init__(self, settings: Settings):
        self.header_timeout = settings.header_timeout_s
        self.body_gap_timeout = settings.body_gap_timeout_s
        self.body_timeout = settings.body_timeout_s
        self.max_header_bytes = settings.max_header_bytes
        self.max_connections = settings.max_connections
        self.max_per_client = settings.max_connections_per_client
        self.interval = min(1.0, max(0.05, min(self.header_timeout, self.body_gap_timeout) / 4))
        self.per_client: dict[str, int] = {}
        self.live: set[GuardedHttpToolsProtocol] = set()
        self.refused = 0
        self.timed_out = 0
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, conn: GuardedHttpToolsProtocol) -> bytes | None:
        """None to admit (and count) the connection, else the response refusing it."""
        if len(self.live) >= self.max_connections:
            self.refused += 1
            return TOO_MANY_CONNECTIONS
        addr = conn.client[0] if conn.client else ""
        n = self.per_client.get(addr, 0)
        if n >= self.max_per_client:
            self.refused += 1
            return TOO_MANY_FROM_CLIENT
        self.per_client[addr] = n + 1
        self.live.add(conn)
        if self._timer is None:
            self._timer = conn.loop.call_later(self.interval, self._sweep, conn.loop)
        return None

    def release(self, conn: GuardedHttpToolsProtocol) -> None:
        self.live.discard(conn)
        addr = conn.client[0] if conn.client else ""
        n = self.per_client.get(addr, 0) - 1
        if n > 0:
            self.per_client[addr] = n
        else:
            self.per_client.pop(addr, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for conn in list(self.live):
            if conn.expired(now):
                self.timed_out += 1
        self._timer = loop.call_later(self.interval, self._sweep, loop) if self.live else None


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read deadlines, a header size limit and
    connection caps (the class made by `guarded_protocol` carries its guard).

    Per request it overrides only `data_received` (which uvicorn's already is) and
    `on_headers_complete`, and reads no clock: the sweeper stamps each phase's deadline
    when it first sees the phase (deadline precision: one sweep interval, at most a
    quarter of the shortest timeout), and notices body progress by a counter."""

    guard: ClassVar[ConnectionGuard]
    # `connection_lost` tells the request in flight (`gateway.direct_body.disconnect_notice`).
    notifies_disconnect: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head = self.guard.max_header_bytes
        self._phase = _IDLE
        self._head_bytes = 0
        self._deadline = 0.0  # the phase's (header, or body total); 0: not stamped yet
        self._gap_deadline = 0.0  # body: the next chunk's
        self._fed = 0  # data_received calls: body progress, as the sweeper sees it
        self._fed_seen = 0
        self._admitted = False
        self._too_large = False

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal = self.guard.admit(self)
        if refusal is not None:
            transport.write(refusal)
            transport.close()
            return
        self._admitted = True
        self._phase = _HEAD
        self._deadline = self.loop.time() + self.guard.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.guard.release(self)
        super().connection_lost(exc)
        if self.cycle is not None:
            notify_disconnect(self.cycle)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        self._fed += 1
        phase = self._phase
        if phase != _HEAD:
            cycle = self.cycle
            if phase == _IDLE or cycle is None or not cycle.more_body:
                # A new request's first bytes: its header deadline starts (stamped by the
                # sweeper), and its head is counted from here.
                self._phase = phase = _HEAD
                self._deadline = 0.0
                self._head_bytes = 0
        if phase == _HEAD:
            self._head_bytes += len(data)
        # uvicorn's data_received, with the 431 told apart from other parser errors.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._too_large:
                self._end(HEADERS_TOO_LARGE)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase == _HEAD and self._head_bytes > self._max_head:
            self._end(HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        if self._head_bytes > self._max_head:  # the raw count may include body bytes
            size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if size > self._max_head:
                self._too_large = True
                raise _HeadersTooLarge
        self._phase = _BODY
        self._deadline = 0.0
        _base_headers_complete(self)  # not super(): a measurable share of this call

    # ------------------------------------------------------------------ deadlines

    def expired(self, now: float) -> bool:
        """Called by the sweeper: stamp a new phase's deadlines, end the connection if
        its phase ran out of time."""
        phase = self._phase
        if phase == _HEAD:
            if not self._deadline:
                self._deadline = now + self.guard.header_timeout
                return False
            if now < self._deadline:
                return False
            # Nothing of a request yet: just close; else say why.
            self._end(HEADER_TIMEOUT if self._head_bytes else None)
            return True
        if phase == _BODY:
            cycle = self.cycle
            if cycle is None or not cycle.more_body:
                return False  # the body is in: the app's turn, not the client's
            guard = self.guard
            if not self._deadline:
                self._deadline = now + guard.body_timeout
                self._gap_deadline = now + guard.body_gap_timeout
                self._fed_seen = self._fed
                return False
            if self._fed != self._fed_seen or self.flow.read_paused:
                # Bytes arrived since the last sweep (or the app is not reading: not the
                # client's delay): the gap restarts.
                self._fed_seen = self._fed
                self._gap_deadline = now + guard.body_gap_timeout
            if now < self._deadline and now < self._gap_deadline:
                return False
            self._end(BODY_TIMEOUT)
            return True
        return False

    def _end(self, response: bytes | None) -> None:
        """Answer `response` (unless the app has started answering) and close; the app's
        `receive()` sees a disconnect and its `send()` does nothing."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None:
            # In the body phase `cycle` is this request's: if it has answered (say, a 413
            # before reading the rest), a second answer would corrupt the stream. In the
            # header phase it is the previous request's: if that one is still answering
            # (pipelining), likewise say nothing.
            answering = (
                cycle.response_started if self._phase == _BODY else not cycle.response_complete
            )
            if answering:
                response = None
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        if response is not None:
            self.transport.write(response)
        self._phase = _IDLE
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to one server's limits (uvicorn instantiates it per
    connection, so the shared guard rides on the class)."""
    guard = ConnectionGuard(settings)
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})


def _check_fd_limit(settings: Settings) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and settings.max_connections > soft - 64:
        log.warning(
            "GATEWAY_MAX_CONNECTIONS is %d but this process may open only %d files: "
            "raise `ulimit -n` or lower the setting",
            settings.max_connections,
            soft,
        )


def listen_sockets(
    config: uvicorn.Config, settings: Settings, reuse_port: bool = False
) -> list[socket.socket]:
    """The public socket, and the admin socket when `GATEWAY_ADMIN_PORT` is set (both
    bound here, once, and inherited by every front door under `serve --workers N`).

    `reuse_port` (front doors on Linux): the public socket is bound with SO_REUSEPORT so
    that each front door can bind its own beside it (`reuse_port_socket`); this one then
    only holds the port and never listens."""
    sockets = [_reuse_port_bind(config) if reuse_port else config.bind_socket()]
    if settings.admin_port is not None:
        host = settings.admin_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        admin = socket.socket(family, socket.SOCK_STREAM)
        admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            admin.bind((host, settings.admin_port))
        except OSError as e:
            admin.close()
            where = f"{host}:{settings.admin_port}"
            raise SystemExit(f"error: cannot bind the admin port {where}: {e}") from None
        admin.set_inheritable(True)
        sockets.append(admin)
    return sockets


def _reuse_port_bind(config: uvicorn.Config) -> socket.socket:
    host = config.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, config.port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: cannot bind {host}:{config.port}: {e}") from None
    sock.set_inheritable(True)
    return sock


def reuse_port_socket(held: socket.socket) -> socket.socket:
    """A front door's own listening socket on the address `held` (bound by the parent with
    SO_REUSEPORT) holds: the kernel then spreads new connections over the front doors by
    a hash of each connection's addresses. With one shared socket, whichever front door
    woke first accepted every pending connection (libuv accepts until EAGAIN): a burst of
    256 connections split 0/0/117/139 over four front doors, 60/60/61/75 with a socket
    each (bench/accept_spread.py; docs/benchmarks.md, "Front doors")."""
    sock = socket.socket(held.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(held.getsockname()[:2])
    return sock


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The one way the gateway is served: uvloop, the guarded httptools protocol, and
    the keep-alive idle timeout from the settings."""
    _check_fd_limit(settings)
    kwargs: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": guarded_protocol(settings),
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "proxy_headers": False,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "timeout_graceful_shutdown": 30,
    }
    kwargs.update(overrides)
    return uvicorn.Config(app, **kwargs)
