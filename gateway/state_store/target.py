"""Where the shared state's Redis is and how to reach it: TLS, ACL users, Sentinel.

`RedisTarget` is built once from the `GATEWAY_REDIS_*` settings and read by both clients
of `gateway.state_store.redis` (redis-py for the cold commands, the pipelined
`gateway.state_store.resp` client for the two hot-path scripts), so they always reach the
same server the same way:

- `rediss://` is TLS. `GATEWAY_REDIS_TLS_CA` is the CA bundle that signed the server's
  certificate (empty: the system's CAs, as for a managed service);
  `GATEWAY_REDIS_TLS_CERT` / `GATEWAY_REDIS_TLS_KEY` are a client certificate for servers
  that require one (`tls-auth-clients yes`); `GATEWAY_REDIS_TLS_CHECK_HOSTNAME=false`
  accepts a certificate that does not name the host (a Sentinel-announced IP, say).
- An ACL user is `redis://user:password@host/0`, or `GATEWAY_REDIS_USERNAME` /
  `GATEWAY_REDIS_PASSWORD`, which win over the URL (a password from a Secret need not be
  pasted into a URL).
- Sentinel: with `GATEWAY_REDIS_SENTINELS=host:port,...` the primary of the service
  `GATEWAY_REDIS_SENTINEL_MASTER` is asked from the sentinels on every new connection
  (and again after a failover); the URL then gives only the scheme, the user, the
  password and the database, its host is not used. Sentinels are reached with the same
  TLS settings as the data nodes and, when they require one, `GATEWAY_REDIS_SENTINEL_PASSWORD`.

Not here: the timeouts and the pool's size (the store chooses them and passes them in),
what to do when Redis does not answer (`gateway.limits`').
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.sentinel import Sentinel


class RedisSettings(Protocol):
    """The settings `RedisTarget.from_settings` reads (`gateway.settings.Settings` has
    them; a protocol, so this module does not import the settings that check with it)."""

    redis_url: str
    redis_username: str
    redis_password: str
    redis_tls_ca: str
    redis_tls_cert: str
    redis_tls_key: str
    redis_tls_check_hostname: bool
    redis_sentinels: str
    redis_sentinel_master: str
    redis_sentinel_password: str


DEFAULT_MASTER = "mymaster"  # Redis's own example name for a monitored primary


@dataclass(frozen=True, slots=True)
class RedisTarget:
    # Kept out of repr (logs, tracebacks): the URL may carry a password.
    url: str = field(repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_check_hostname: bool = True
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = DEFAULT_MASTER
    sentinel_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        scheme = urlparse(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"GATEWAY_REDIS_URL: unknown scheme {scheme!r} (redis, rediss, unix)")
        tls_set = self.tls_ca or self.tls_cert or self.tls_key
        if tls_set and scheme != "rediss":
            raise ValueError("GATEWAY_REDIS_TLS_* are set: GATEWAY_REDIS_URL must be rediss://")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("GATEWAY_REDIS_TLS_CERT and GATEWAY_REDIS_TLS_KEY go together")
        if self.sentinels and scheme == "unix":
            raise ValueError("Sentinel needs a redis:// or rediss:// GATEWAY_REDIS_URL")

    @classmethod
    def from_settings(cls, s: RedisSettings) -> RedisTarget:
        return cls(
            url=s.redis_url,
            username=s.redis_username,
            password=s.redis_password,
            tls_ca=s.redis_tls_ca,
            tls_cert=s.redis_tls_cert,
            tls_key=s.redis_tls_key,
            tls_check_hostname=s.redis_tls_check_hostname,
            sentinels=parse_sentinels(s.redis_sentinels),
            sentinel_master=s.redis_sentinel_master or DEFAULT_MASTER,
            sentinel_password=s.redis_sentinel_password,
        )

    # -- the URL's parts, the settings winning --------------------------------------

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "rediss"

    @property
    def tcp(self) -> bool:
        return urlparse(self.url).scheme in ("redis", "rediss")

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 6379

    @property
    def db(self) -> int:
        return int((urlparse(self.url).path or "/0").strip("/") or 0)

    @property
    def user(self) -> str | None:
        u = urlparse(self.url).username
        return self.username or (unquote(u) if u else None)

    @property
    def secret(self) -> str | None:
        p = urlparse(self.url).password
        return self.password or (unquote(p) if p else None)

    # -- what each client needs ---------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client side of TLS for the RESP client (None for plain TCP)."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca or None)
        ctx.check_hostname = self.tls_check_hostname
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's connection arguments for TLS (empty for plain TCP)."""
        if not self.tls:
            return {}
        return {
            "ssl_ca_certs": self.tls_ca or None,
            "ssl_certfile": self.tls_cert or None,
            "ssl_keyfile": self.tls_key or None,
            "ssl_check_hostname": self.tls_check_hostname,
            "ssl_cert_reqs": "required",
        }

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py's arguments for one data node, less its address (TCP only)."""
        return {
            "db": self.db,
            "username": self.user,
            "password": self.secret,
            **self.tls_kwargs(),
        }

    def sentinel_kwargs(self, timeout_s: float) -> dict[str, Any]:
        """redis-py's arguments for the sentinels themselves."""
        out: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        if self.sentinel_password:
            out["password"] = self.sentinel_password
        if self.tls:
            out.update(ssl=True, **self.tls_kwargs())
        return out

    def async_sentinel(self, timeout_s: float) -> Any:
        """redis-py's asyncio `Sentinel` over the configured sentinels (None without)."""
        if not self.sentinels:
            return None
        return AsyncSentinel(list(self.sentinels), sentinel_kwargs=self.sentinel_kwargs(timeout_s))

    def async_pool(self, sentinel: Any, **pool: Any) -> Any:
        """A bounded, blocking redis-py pool on the primary: through `sentinel` (from
        `async_sentinel`) when there is one, else on the URL's address."""
        if sentinel is not None:
            blocking: Any = _BlockingSentinelPool
            return blocking(
                self.sentinel_master,
                sentinel,
                ssl=self.tls,
                **pool,
                **self.connection_kwargs(),
            )
        if not self.tcp:
            return aioredis.BlockingConnectionPool.from_url(self.url, **pool)
        connection = aioredis.SSLConnection if self.tls else aioredis.Connection
        return aioredis.BlockingConnectionPool(
            connection_class=connection,
            host=self.host,
            port=self.port,
            **pool,
            **self.connection_kwargs(),
        )

    def sync_client(self, socket_timeout: float) -> Any:
        """A blocking redis-py client on the primary (the process supervisor's one read)."""
        if self.sentinels:
            node: dict[str, Any] = {"socket_timeout": socket_timeout, "decode_responses": True}
            node.update(ssl=self.tls, **self.connection_kwargs())
            sentinel = Sentinel(
                list(self.sentinels), sentinel_kwargs=self.sentinel_kwargs(socket_timeout), **node
            )
            return sentinel.master_for(self.sentinel_master)
        if not self.tcp:
            return redis.Redis.from_url(
                self.url, socket_timeout=socket_timeout, decode_responses=True
            )
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=socket_timeout,
            decode_responses=True,
            ssl=self.tls,
            **self.connection_kwargs(),
        )


def parse_sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """ "host:port,host:port" (port 26379 when left out; [v6]:port for IPv6)."""
    out = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            host, port = item, "26379"
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (the primary's address asked on each new connection, idle ones
    closed when it changes) with the blocking pool's bounded size and waiting:
    SentinelConnectionPool defines neither get_connection nor release."""
