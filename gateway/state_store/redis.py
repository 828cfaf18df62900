"""`RedisStore`: the shared state in Redis, for several gateway processes or hosts.

Each limiter decision and each settlement is ONE Lua script (atomic on the server, one
round trip): admission reads the key's bucket, decides by GCRA against the server's own
clock (`TIME`, so hosts with skewed clocks agree) and writes the new state — or answers
"stale" when the key's record changed since the caller read it (a version counter bumped
by every `put_key`, so a revocation is seen at the key's next request); settlement
releases the parallel slot, returns the unused part of the token reservation, adds the
spent tokens and writes the usage ledger, all at once. The arithmetic is the same as
`gateway.state_store.memory.gcra_admit`.

Every command runs with `socket_timeout` = the configured timeout (≤ 50 ms by default) and
no client-side retries; any failure becomes `StoreUnavailable`. Opening a pooled connection
may take `CONNECT_TIMEOUT_S`, and waiting for a free one (this process queueing) up to
`POOL_WAIT_S`: measured, 1,000 concurrent admissions on a cold pool of unbounded size missed
a 50 ms budget 969 times out of 1,000 on connects alone.

Layout under the prefix P: `P:keys` (hash id → record JSON), `P:lim:<id>` (hash rtat, ttat,
par, res, spent, ver), `P:use:<id>:<day>` (hash model\x1ffield → count), `P:days:<id>` (set of
days), `P:map:<name>` (hash), `P:once:<epoch>` (bitmap: settlements written, behind
Sentinel).
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.state_store import WINDOW_MS, Decision, Limits, StoreUnavailable, Usage
from gateway.state_store.resp import ReplyError, RespClient, encode
from gateway.state_store.target import RedisTarget

POOL_SIZE = 32
# Waiting for a pooled connection is this process queueing (CPU-bound under a burst), not
# Redis being slow: not an outage. A black-holed Redis still frees each connection after
# the command timeout.
POOL_WAIT_S = 30.0
# Opening a connection (rare: the pool keeps them) may take longer than one command under
# a burst on a busy host; a refused connection still fails at once.
CONNECT_TIMEOUT_S = 0.5

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local maxpar, budget, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local W, prompt = tonumber(ARGV[6]), tonumber(ARGV[8]) or 0
local h = redis.call('HMGET', KEYS[1], 'rtat', 'ttat', 'par', 'res', 'spent', 'ver')
if ARGV[7] ~= '' and (h[6] or '0') ~= ARGV[7] then
  return {'stale', 0, 0, 0, 0, 0}
end
local rtat = math.max(tonumber(h[1]) or 0, now)
local ttat = math.max(tonumber(h[2]) or 0, now)
local par, res, spent = tonumber(h[3]) or 0, tonumber(h[4]) or 0, tonumber(h[5]) or 0
local reason, retry = '', 0
local rnew, tnew = rtat, ttat
if budget > 0 and (spent >= budget or spent + prompt > budget) then
  reason, retry = 'budget', -1
elseif budget > 0 and spent + res + prompt > budget then
  reason, retry = 'held', 1000
elseif maxpar > 0 and par >= maxpar then
  reason, retry = 'parallel', 1000
else
  if rpm > 0 then
    rnew = rtat + W / rpm
    if rnew - now > W then reason, retry = 'requests', rnew - now - W end
  end
  if reason == '' and tpm > 0 then
    tnew = ttat + math.min(cost, tpm) * W / tpm
    if tnew - now > W then reason, retry = 'tokens', tnew - now - W end
  end
end
if reason ~= '' then
  rnew, tnew = rtat, ttat
else
  redis.call('HSET', KEYS[1], 'rtat', tostring(rnew), 'ttat', tostring(tnew),
             'par', par + 1, 'res', res + cost)
end
local remr, remt = -1, -1
if rpm > 0 then remr = math.floor((W - (rnew - now)) * rpm / W) end
if tpm > 0 then remt = math.floor((W - (tnew - now)) * tpm / W) end
return {reason, math.floor(retry), remr, math.floor(rnew - now), remt, math.floor(tnew - now)}
"""

_SETTLE = """
local tpm, reserved = tonumber(ARGV[1]), tonumber(ARGV[2])
local prompt, completion = tonumber(ARGV[3]), tonumber(ARGV[4])
local W = tonumber(ARGV[8])
local used = prompt + completion
local release = ARGV[9] == '1'
local h = redis.call('HMGET', KEYS[1], 'ttat', 'par')
local par = tonumber(h[2]) or 0
redis.call('HINCRBY', KEYS[1], 'spent', used)
if release and par > 0 then redis.call('HINCRBY', KEYS[1], 'par', -1) end
if release then redis.call('HINCRBY', KEYS[1], 'res', -reserved) end
if release and tpm > 0 and h[1] then
  local refund = math.min(reserved, tpm) - math.min(used, tpm)
  redis.call('HSET', KEYS[1], 'ttat', tostring(tonumber(h[1]) - refund * W / tpm))
end
local m = ARGV[5]
redis.call('HINCRBY', KEYS[2], m .. '\\31prompt_tokens', prompt)
redis.call('HINCRBY', KEYS[2], m .. '\\31completion_tokens', completion)
redis.call('HINCRBY', KEYS[2], m .. '\\31requests_' .. ARGV[6], 1)
redis.call('SADD', KEYS[3], ARGV[7])
return 1
"""


# Behind Sentinel a settlement counts as written only once a replica holds it (WAIT 1):
# Redis replicates asynchronously, and what the old primary acknowledged in its last
# event-loop turn before the promotion is lost (the failover test lost up to 3 of 160
# requests' usage that way). One that is not confirmed is queued and retried, so it must
# be written once however often it is sent: this guard, run before the settlement, sets
# the settlement's bit (`Usage.once`, "epoch/n") in the epoch's bitmap and skips the rest
# when it was set already. It takes the last key and the last argument for itself, so
# the settlement script below it reads its own keys and arguments unchanged.
_ONCE = """
local bits, bit = KEYS[#KEYS], ARGV[#ARGV]
KEYS[#KEYS], ARGV[#ARGV] = nil, nil
if redis.call('SETBIT', bits, bit, 1) == 1 then return 0 end
redis.call('EXPIRE', bits, 172800)
"""
_SETTLE_ONCE = _ONCE + _SETTLE


class RedisStore:
    name = "redis"

    def __init__(self, url: str | RedisTarget, prefix: str = "gw", timeout_s: float = 0.05):
        self.prefix = prefix
        # Where Redis is and how to reach it (TLS, ACL user, Sentinel): one target for
        # both clients below.
        target = RedisTarget(url) if isinstance(url, str) else url
        self._sentinel = target.async_sentinel(max(timeout_s, CONNECT_TIMEOUT_S))
        # A bounded pool: under a burst of requests, new connections (each a connect and
        # a handshake) are what missed the timeout; a few warm ones serve thousands of
        # scripts a second. Waiting for one counts against the same timeout.
        pool = target.async_pool(
            self._sentinel,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT_S,
            socket_timeout=timeout_s,
            socket_connect_timeout=max(timeout_s, CONNECT_TIMEOUT_S),
            retry_on_timeout=False,
            decode_responses=True,
            health_check_interval=0,
        )
        self._redis: Any = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        # The two hot-path scripts go over a pipelined connection of our own
        # (gateway.state_store.resp: its docstring has the measured reason).
        self._fast: RespClient | None = None
        if target.tcp:
            resolve = self._primary if self._sentinel is not None else None
            self._fast = RespClient(target, timeout_s, resolve)
        self._master = target.sentinel_master
        # Behind Sentinel, settlements on a connection of their own: each is followed by
        # a WAIT for the replica, which must not hold up admissions behind it.
        self._settler: RespClient | None = None
        if self._fast is not None and self._sentinel is not None:
            self._settler = RespClient(target, timeout_s, self._primary)
        self._wait_ms = max(1, int(timeout_s * 500))
        scripts = (_ADMIT, _SETTLE, _SETTLE_ONCE)
        self._sha = {s: hashlib.sha1(s.encode()).hexdigest() for s in scripts}

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from None

    async def _primary(self) -> tuple[str, int]:
        """The primary's address as the sentinels name it now (the RESP client's)."""
        host, port = await self._call(self._sentinel.discover_master(self._master))
        return str(host), int(port)

    async def start(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        if self._settler is not None:
            await self._settler.close()
        await self._redis.aclose(close_connection_pool=True)
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def _script(
        self, script: str, keys: list[str], args: list[Any], via: RespClient | None = None
    ) -> Any:
        """EVALSHA (EVAL once when Redis does not hold the script yet)."""
        fast = via or self._fast
        if fast is None:
            sha_script = self._admit if script is _ADMIT else self._settle
            return await self._call(sha_script(keys=keys, args=args))
        tail = (len(keys), *keys, *args)
        reply = await fast.call(encode("EVALSHA", self._sha[script], *tail))
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await fast.call(encode("EVAL", script, *tail))
        if isinstance(reply, ReplyError):
            raise StoreUnavailable(f"script: {reply}")
        return reply

    async def get_key(self, key_id: str) -> tuple[str, str] | None:
        async def both() -> Any:
            async with self._redis.pipeline(transaction=True) as p:
                p.hget(self._k("keys"), key_id)
                p.hget(self._k("lim", key_id), "ver")
                return await p.execute()

        value, version = await self._call(both())
        return (value, version or "0") if isinstance(value, str) else None

    async def put_key(self, key_id: str, record: str) -> None:
        """Write the record and bump its version: every process's admission script sees
        the change at that key's next request (`admit`'s `version`)."""

        async def both() -> Any:
            async with self._redis.pipeline(transaction=True) as p:
                p.hset(self._k("keys"), key_id, record)
                p.hincrby(self._k("lim", key_id), "ver", 1)
                return await p.execute()

        await self._call(both())

    async def list_keys(self) -> dict[str, str]:
        return dict(await self._call(self._redis.hgetall(self._k("keys"))))

    async def admit(
        self,
        key_id: str,
        limits: Limits,
        cost: int,
        now_ms: float,
        version: str = "",
        prompt: int = 0,
    ) -> Decision:
        args = [
            *(limits.rpm, limits.tpm, limits.max_parallel, limits.budget_tokens, cost),
            *(WINDOW_MS, version, prompt),
        ]
        r = await self._script(_ADMIT, [self._k("lim", key_id)], args)
        return Decision(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]))

    async def settle(self, key_id: str, limits: Limits, usage: Usage, day: str) -> None:
        keys = [self._k("lim", key_id), self._k("use", key_id, day), self._k("days", key_id)]
        args: list[str | int | float] = [
            limits.tpm,
            usage.reserved,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.model,
            usage.outcome,
            day,
            WINDOW_MS,
            "1" if usage.release else "0",
        ]
        if usage.once and self._settler is not None:
            epoch, bit = usage.once.split("/")
            keys.append(self._k("once", epoch))
            args.append(int(bit))
            await self._script(_SETTLE_ONCE, keys, args, via=self._settler)
            acked = await self._settler.call(encode("WAIT", 1, self._wait_ms))
            if not isinstance(acked, int) or acked < 1:
                raise StoreUnavailable("settlement not confirmed by a replica in time")
            return
        await self._script(_SETTLE, keys, args)

    async def outstanding(self, key_id: str) -> tuple[int, int]:
        par, res = await self._call(self._redis.hmget(self._k("lim", key_id), "par", "res"))
        return int(par or 0), int(res or 0)

    async def usage(self, key_id: str) -> dict[str, dict[str, int]]:
        days = await self._call(self._redis.smembers(self._k("days", key_id)))
        out: dict[str, dict[str, int]] = {}
        for day in sorted(days):
            raw = await self._call(self._redis.hgetall(self._k("use", key_id, day)))
            out[day] = {k: int(v) for k, v in raw.items()}
        return out

    async def map_set(self, name: str, field: str, value: str) -> None:
        await self._call(self._redis.hset(self._k("map", name), field, value))

    async def map_delete(self, name: str, field: str) -> None:
        await self._call(self._redis.hdel(self._k("map", name), field))

    async def map_all(self, name: str) -> dict[str, str]:
        return dict(await self._call(self._redis.hgetall(self._k("map", name))))
