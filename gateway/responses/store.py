"""Stored responses: one JSON record per response id, scoped to the API key that created it.

Owns `ResponseStore` (put / get / delete of a record under (owner, id)), its two backends —
`MemoryResponses` (this process: one box, the default) and `RedisResponses`
(`GATEWAY_REDIS_URL`: every front door and host sees the same records) — and `owner_of`,
which names the scope of a caller. Records are opaque bytes here (`gateway.responses.
translate` owns their content). Each record lives `GATEWAY_RESPONSES_TTL_S` and a key holds
at most `GATEWAY_RESPONSES_MAX_BYTES_PER_KEY` bytes of them, its oldest evicted first; an
evicted or expired record is simply absent (the route answers 404). Another key's id is
never found: the owner is part of the record's address, not a field checked after reading.

Redis layout under the prefix P (the state store's, `GATEWAY_REDIS_PREFIX`):
`P:resp:<owner>:<id>` (the record, with the TTL), `P:respidx:<owner>` (sorted set id →
created ms, oldest first) and `P:respsz:<owner>` (hash id → bytes, and `#total`). A put and
a delete are each one Lua script (the size bound is a decision over several keys). The
client is redis-py on the same target as the state store (`gateway.state_store.target`:
TLS, ACL user, Sentinel), with a pool of its own: records may be large, so their timeout
is not the hot path's 50 ms.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError

from engines.errors import EngineUnavailable

if TYPE_CHECKING:
    from gateway.limits import Tenant
    from gateway.settings import Settings

__all__ = ["MemoryResponses", "RedisResponses", "ResponseStore", "make_store", "owner_of"]

# A record is one GET or SET of up to a few MB; loopback or a managed Redis answers that in
# milliseconds, and a stored response is not on the chat hot path.
REDIS_TIMEOUT_S = 2.0
POOL_SIZE = 16


def owner_of(tenant: Tenant | None, authorization: bytes | None) -> str:
    """The scope of a caller's records: a hashed key's id; for a plaintext key
    (`GATEWAY_API_KEYS`), a digest of it; "-" when no key is configured (one shared scope,
    as every caller is the same caller then)."""
    if tenant is not None:
        return tenant.key_id
    if authorization:
        return "p" + hashlib.sha256(authorization).hexdigest()[:24]
    return "-"


class ResponseStore(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def put(self, owner: str, rid: str, record: bytes) -> None: ...
    async def get(self, owner: str, rid: str) -> bytes | None: ...
    async def delete(self, owner: str, rid: str) -> bool: ...


class MemoryResponses:
    """Records in this process's memory: per owner, oldest first."""

    name = "memory"

    def __init__(self, ttl_s: float, max_bytes: int, clock: Any = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._owners: dict[str, OrderedDict[str, tuple[float, bytes]]] = {}
        self._bytes: dict[str, int] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._owners.clear()
        self._bytes.clear()

    def _expire(self, owner: str, now: float) -> OrderedDict[str, tuple[float, bytes]] | None:
        records = self._owners.get(owner)
        if records is None:
            return None
        while records:  # oldest first: every record lives the same TTL
            rid, (expires, data) = next(iter(records.items()))
            if expires > now:
                break
            del records[rid]
            self._bytes[owner] -= len(data)
        if not records:
            del self._owners[owner], self._bytes[owner]
            return None
        return records

    async def put(self, owner: str, rid: str, record: bytes) -> None:
        if len(record) > self.max_bytes:
            return  # larger than a key may hold: never stored, so later a 404
        now = self._clock()
        records = self._expire(owner, now)
        if records is None:
            records = self._owners[owner] = OrderedDict()
            self._bytes[owner] = 0
        old = records.pop(rid, None)
        if old is not None:
            self._bytes[owner] -= len(old[1])
        records[rid] = (now + self.ttl_s, record)
        total = self._bytes[owner] + len(record)
        while total > self.max_bytes:
            _, (_, data) = records.popitem(last=False)
            total -= len(data)
        self._bytes[owner] = total

    async def get(self, owner: str, rid: str) -> bytes | None:
        records = self._expire(owner, self._clock())
        hit = records.get(rid) if records is not None else None
        return hit[1] if hit is not None else None

    async def delete(self, owner: str, rid: str) -> bool:
        records = self._expire(owner, self._clock())
        old = records.pop(rid, None) if records is not None else None
        if old is None:
            return False
        self._bytes[owner] -= len(old[1])
        return True


# KEYS: record, index, sizes; ARGV: record, ttl s, max bytes, id, the records' key prefix.
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local size = string.len(ARGV[1])
if size > cap then return 0 end
local function drop(id)
  redis.call('ZREM', KEYS[2], id)
  local sz = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HDEL', KEYS[3], id)
  redis.call('DEL', ARGV[5] .. id)
  return redis.call('HINCRBY', KEYS[3], '#total', -sz)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000)) do
  drop(id)
end
if redis.call('HEXISTS', KEYS[3], ARGV[4]) == 1 then drop(ARGV[4]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('HSET', KEYS[3], ARGV[4], size)
local total = redis.call('HINCRBY', KEYS[3], '#total', size)
while total > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  total = drop(oldest[1])
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 1
"""

# KEYS: record, index, sizes; ARGV: id.
_DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local sz = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[3], '#total', -sz)
end
return n
"""


class RedisResponses:
    """Records in Redis, shared by every front door and host of the deployment."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        import redis.asyncio as aioredis

        from gateway.state_store.target import RedisTarget

        target = RedisTarget.from_settings(settings)
        self.prefix = settings.redis_prefix
        self.ttl_s = settings.responses_ttl_s
        self.max_bytes = settings.responses_max_bytes_per_key
        self._sentinel = target.async_sentinel(REDIS_TIMEOUT_S)
        pool = target.async_pool(
            self._sentinel,
            max_connections=POOL_SIZE,
            timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=0,
        )
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)

    def _keys(self, owner: str, rid: str) -> list[str]:
        p = self.prefix
        return [f"{p}:resp:{owner}:{rid}", f"{p}:respidx:{owner}", f"{p}:respsz:{owner}"]

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError, TimeoutError):
            raise EngineUnavailable(
                "The response store is unavailable; retry shortly.", retry_after=1
            ) from None

    async def start(self) -> None:
        return None  # connections open on first use; an outage is a 503 per request

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def put(self, owner: str, rid: str, record: bytes) -> None:
        keys = self._keys(owner, rid)
        args: list[bytes | str | int] = [
            record,
            self.ttl_s,
            self.max_bytes,
            rid,
            f"{self.prefix}:resp:{owner}:",
        ]
        await self._call(self._put(keys=keys, args=args))

    async def get(self, owner: str, rid: str) -> bytes | None:
        data = await self._call(self._redis.get(self._keys(owner, rid)[0]))
        return bytes(data) if data is not None else None

    async def delete(self, owner: str, rid: str) -> bool:
        n = await self._call(self._delete(keys=self._keys(owner, rid), args=[rid]))
        return bool(n)


def make_store(settings: Settings) -> ResponseStore:
    """Redis when the deployment has it (a chain then works across front doors), else
    this process's memory."""
    if settings.redis_url:
        return RedisResponses(settings)
    return MemoryResponses(settings.responses_ttl_s, settings.responses_max_bytes_per_key)
