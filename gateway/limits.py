"""Admission for API keys: who is calling, may they, and what they used.

`Tenancy` is the one object the request path talks to:
- `authenticate` turns the Bearer token into a `Tenant` (a hashed key's record), or checks
  it against the plaintext list (`GATEWAY_API_KEYS`, the simple mode), or lets anyone in
  when neither is configured;
- `admit` takes one atomic limiter decision for the tenant (`StateStore.admit`): requests
  per minute, tokens per minute (prompt estimate + max_tokens reserved now), parallel
  requests and the token budget (admitted while spent + reserved by requests in flight +
  this prompt ≤ budget, so a key ends at most one request's max_tokens over it; a budget
  held by requests in flight is a retryable 429, a spent one `insufficient_quota`);
  refuses with OpenAI's 429s and returns a `Ticket` whose `x-ratelimit-*` headers go on
  the response and on every 429 of the limiter;
- `settle` (from the request's record, whatever its outcome) returns the unused part of the
  reservation and writes the usage ledger (`StateStore.settle`) in the background; what
  cannot be written yet is queued and flushed when the store answers again or at shutdown.

A stream cut before its usage chunk (the client left, or the engine failed mid-stream) is
counted with the model's own tokenizer (`gateway.usage_count`: the prompt, and the text
the client was sent, through the engine's /tokenize) in the settlement's background task.
Where the engine cannot tokenize, it is estimated: completion tokens = the relayed events
that carried text, prompt tokens = the prompt's JSON bytes × a tokens-per-byte ratio learnt
per model from real usage. The same ratio sizes the prompt part of a TPM reservation.

Outage policy (`GATEWAY_REDIS_OUTAGE`): "closed" answers 503 while Redis does not answer;
"local" decides in this process with every limit divided by N (`GATEWAY_REDIS_LOCAL_SHARE`,
default the number of front doors), so N processes together stay near the limit; the
token budget is not enforced then (its running total lives in Redis). Several front doors
with the in-memory store (a keys file, no Redis) likewise each decide at limit ÷ N, and
each counts usage and budget for itself.

One Redis round trip per request: a verified key record is kept in this process for
`KEY_CACHE_S` with the version it was read at, and the admission script compares that
version with the key's current one (`KeyAdmin` bumps it on every change), answering
"stale" instead of deciding when they differ — then the record is read again and the
request decided on it (a revoked key gets its 401 at its next request, in every process).
During an outage the last record seen is used, and an unknown key gets 503. The
change of state is one log line and the `gateway_state_store_degraded` gauge; after a
failure Redis is tried again after `RETRY_S`, not on every request (no 50 ms wait each).

One module of this size because authentication, admission and settlement share the key
cache, the outage state and the learnt prompt-size ratio; the store calls themselves are
`gateway.state_store`'s and the key records `gateway.keys`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from engines.base import ServingError, Usage
from gateway.errors import (
    AuthenticationError,
    EngineUnavailable,
    PermissionDenied,
)
from gateway.keys import KeyRecord, KeysFile, matches, split
from gateway.state_store import Decision, Limits, StateStore, StoreUnavailable
from gateway.state_store import Usage as Spent
from gateway.state_store.memory import MemoryStore
from gateway.usage_count import streamed_text

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.settings import Settings

log = logging.getLogger("gateway.limits")

# The keys file is checked for changes at most this often (its mtime).
KEY_TTL_S = 1.0
# A record read from Redis is reused this long; the admission script's version check
# catches every change before that, so this only bounds memory for keys no longer used.
KEY_CACHE_S = 60.0
RETRY_S = 1.0
# Prompt tokens per JSON byte of the prompt before any real usage is seen (then learnt).
BYTES_RATIO = 0.25
# A max_tokens-less request reserves this many completion tokens (settled to the real count).
DEFAULT_RESERVE = 1024
# Settlement ids per epoch: one 128 KiB bitmap in the store, expired two days after use.
ONCE_PER_EPOCH = 1 << 20


class RateLimited(ServingError):
    """429 `rate_limit_exceeded`, with Retry-After and the x-ratelimit headers."""

    status = 429
    type: ClassVar[str] = "requests"

    def __init__(self, message: str, headers: list[tuple[bytes, bytes]], kind: str):
        super().__init__(message, code="rate_limit_exceeded")
        self.headers = headers
        self.type = kind  # type: ignore[misc]  # OpenAI: "requests" or "tokens"


class QuotaExceeded(ServingError):
    """429 `insufficient_quota`: the key's budget is spent (or what is left of it is less
    than this request's prompt); retrying will not help. It carries the same
    `x-ratelimit-*` headers as every other answer to the key."""

    status = 429
    type: ClassVar[str] = "insufficient_quota"

    def __init__(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(
            "You exceeded your current quota: this key's token budget is spent"
            " (or what is left of it is less than this request's prompt).",
            code="insufficient_quota",
        )
        self.headers = [*(headers or ()), (b"x-should-retry", b"false")]


def _duration(ms: int) -> bytes:
    """OpenAI's reset format: "1s", "6m0s", "120ms"."""
    if ms < 1000:
        return b"%dms" % max(ms, 0)
    s = ms / 1000
    if s < 60:
        return f"{s:.3g}s".encode()
    return f"{int(s // 60)}m{int(s % 60)}s".encode()


def ratelimit_headers(limits: Limits, d: Decision) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if limits.rpm:
        out += [
            (b"x-ratelimit-limit-requests", b"%d" % limits.rpm),
            (b"x-ratelimit-remaining-requests", b"%d" % max(d.remaining_requests, 0)),
            (b"x-ratelimit-reset-requests", _duration(d.reset_requests_ms)),
        ]
    if limits.tpm:
        out += [
            (b"x-ratelimit-limit-tokens", b"%d" % limits.tpm),
            (b"x-ratelimit-remaining-tokens", b"%d" % max(d.remaining_tokens, 0)),
            (b"x-ratelimit-reset-tokens", _duration(d.reset_tokens_ms)),
        ]
    return out


@dataclass(slots=True)
class Tenant:
    record: KeyRecord
    # The record's version in the store ("" where there is none: the keys file).
    version: str = ""

    @property
    def key_id(self) -> str:
        return self.record.id


@dataclass(slots=True)
class Ticket:
    """One admitted request's reservation, settled exactly once."""

    tenant: Tenant
    model: str
    reserved: int
    prompt_bytes: int
    limits: Limits
    local: bool
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    settled: bool = False


def estimate(body: dict[str, Any]) -> tuple[int, int]:
    """(prompt JSON bytes, reserved completion tokens) of a request."""
    if "input" in body:  # embeddings
        return len(orjson.dumps(body["input"])), 0
    src = body.get("messages") if "messages" in body else body.get("prompt")
    size = len(orjson.dumps(src)) if src is not None else 0
    mt = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_RESERVE
    n = body.get("n") or 1
    return size, int(mt) * (int(n) if isinstance(n, int) else 1)


def outcome(
    usage: Usage | None, error: ServingError | None, disconnected: bool, blocks: int
) -> str:
    if disconnected:
        return "aborted"
    if error is None:
        return "full"
    return "partial" if usage is not None or blocks else "error"


class Tenancy:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.plain = settings.client_keys
        self.keys_file = KeysFile(settings.keys_file) if settings.keys_file else None
        self.store: StateStore
        if settings.redis_url:
            from gateway.state_store.redis import RedisStore
            from gateway.state_store.target import RedisTarget

            self.store = RedisStore(
                RedisTarget.from_settings(settings),
                settings.redis_prefix,
                settings.redis_timeout_ms / 1000,
            )
        else:
            self.store = MemoryStore()
        self.hashed = bool(settings.redis_url or settings.keys_file)
        self.local = MemoryStore()
        self.share = settings.redis_local_share or settings.workers
        self.degraded = False
        self._retry_at = 0.0
        self.metrics = metrics
        # key id → (record, its version, when read)
        self._keys: dict[str, tuple[KeyRecord, str, float]] = {}
        self._file_mtime = -1.0
        self._file_checked = -math.inf
        self._file_keys: dict[str, KeyRecord] = {}
        # Prompt tokens per prompt JSON byte, learnt per model from real usage.
        self._ratio: dict[str, float] = {}
        self._pending: list[tuple[str, Limits, Spent, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Settlement ids (`Spent.once`): a bitmap per epoch in the store, a bit per id.
        self._epoch, self._seq = uuid.uuid4().hex[:16], 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.store.name == "redis":
            try:
                await self.store.start()
            except StoreUnavailable as e:
                self._mark(True, str(e))

    async def close(self) -> None:
        """Finish every settlement in flight, flush the queued ones, close the store."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        if self._pending:
            log.error("%d usage settlements could not be written", len(self._pending))
        await self.store.close()

    # -- health of the store ---------------------------------------------------------------

    def _mark(self, degraded: bool, why: str = "") -> None:
        if degraded:
            self._retry_at = time.monotonic() + RETRY_S
        if degraded == self.degraded:
            return
        self.degraded = degraded
        if degraded:
            log.warning(
                "state store %s unavailable (%s): outage policy %r",
                self.store.name,
                why,
                self.settings.redis_outage,
            )
        else:
            log.warning("state store %s answers again", self.store.name)
            # What was queued meanwhile goes now, not at the next settlement (there may
            # be none for a while, or only local ones, which do not flush).
            if self._pending:
                self._background(self.flush())
        if self.metrics is not None:
            self.metrics.store_degraded.set(1 if degraded else 0)

    def _skip_store(self) -> bool:
        return self.degraded and time.monotonic() < self._retry_at

    def _unavailable(self) -> ServingError:
        return EngineUnavailable("The rate-limit store is unavailable; retry shortly.")

    # -- who is calling ---------------------------------------------------------------

    async def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant of a hashed key; None when the caller passed a simpler check (the
        plaintext list, or no keys configured at all)."""
        if not self.hashed:
            if self.plain and (token is None or not sum(_eq(token, k) for k in self.plain)):
                raise AuthenticationError()
            return None
        parts = split(token) if token else None
        if parts is None:
            if token is not None and self.plain and sum(_eq(token, k) for k in self.plain):
                return None  # the plaintext list keeps working beside hashed keys
            raise AuthenticationError()
        found = await self._record(parts[0])
        if found is None or not matches(found[0], parts[1]):
            raise AuthenticationError()
        return _usable(Tenant(*found))

    async def _record(self, key_id: str) -> tuple[KeyRecord, str] | None:
        """(record, version) of a key id, from this process's cache when it has one."""
        now = time.monotonic()
        if self.keys_file is not None and self.store.name == "memory":
            if now - self._file_checked >= KEY_TTL_S:
                self._file_checked = now
                mtime = self.keys_file.mtime()
                if mtime != self._file_mtime:
                    self._file_mtime = mtime
                    self._file_keys = self.keys_file.load()
            record = self._file_keys.get(key_id)
            return None if record is None else (record, "")
        cached = self._keys.get(key_id)
        if cached is not None and now - cached[2] < KEY_CACHE_S:
            return cached[0], cached[1]
        if self._skip_store():
            if cached is not None:
                return cached[0], cached[1]
            raise self._unavailable()
        try:
            raw = await self.store.get_key(key_id)
        except StoreUnavailable as e:
            self._mark(True, str(e))
            if cached is not None:
                return cached[0], cached[1]
            raise self._unavailable() from None
        self._mark(False)
        if raw is None:
            self._keys.pop(key_id, None)
            return None
        record = KeyRecord.model_validate_json(raw[0])
        self._keys[key_id] = (record, raw[1], now)
        return record, raw[1]

    async def _reread(self, tenant: Tenant) -> Tenant:
        """The tenant on its key's current record (the admission script said "stale")."""
        self._keys.pop(tenant.key_id, None)
        found = await self._record(tenant.key_id)
        if found is None or found[0].hash != tenant.record.hash:
            raise AuthenticationError()
        return _usable(Tenant(*found))

    # -- may they --------------------------------------------------------------------

    async def admit(self, tenant: Tenant, model: str, body: dict[str, Any]) -> Ticket:
        size, completion = estimate(body)
        prompt = int(size * self._ratio.get(model, BYTES_RATIO)) + 1
        cost = prompt + completion
        local = self._skip_store()
        decision: Decision | None = None
        for _ in range(2):  # a second time only on a record that changed ("stale")
            record = tenant.record
            if record.models is not None and model not in record.models:
                raise PermissionDenied(
                    f"This API key may not use the model `{model}`.", param="model"
                )
            limits = record.limits
            if self.store.name == "memory" and self.share > 1:
                # Several front doors without Redis: each holds its share of the limits.
                limits = _share(limits, self.share, keep_budget=True)
            if local:
                break
            now_ms = time.time() * 1000
            try:
                decision = await self.store.admit(
                    record.id, limits, cost, now_ms, tenant.version, prompt
                )
                self._mark(False)
            except StoreUnavailable as e:
                self._mark(True, str(e))
                local = True
                break
            if decision.reason != "stale":
                break
            tenant = await self._reread(tenant)
            decision = None
        if decision is None and not local:  # changed twice in a row: decide next time
            raise self._unavailable()
        if decision is None:
            if self.settings.redis_outage == "closed":
                raise self._unavailable()
            limits = _share(limits, self.share)
            decision = self.local.admit_now(record.id, limits, cost, time.time() * 1000, prompt)
        headers = ratelimit_headers(record.limits, decision)
        if not decision.admitted:
            if self.metrics is not None:
                self.metrics.key_rate_limited.labels(record.id, decision.reason).inc()
            if decision.reason == "budget":
                raise QuotaExceeded(headers)
            retry_ms = max(decision.retry_after_ms, 1)
            headers += [
                (b"retry-after", b"%d" % max(1, math.ceil(retry_ms / 1000))),
                (b"retry-after-ms", b"%d" % retry_ms),
            ]
            kind = "tokens" if decision.reason in ("tokens", "held") else "requests"
            what = {
                "requests": f"requests per minute (limit {limits.rpm})",
                "tokens": f"tokens per minute (limit {limits.tpm}, this request reserves {cost})",
                "parallel": f"parallel requests (limit {limits.max_parallel})",
                # The rest of the budget is reserved by this key's requests in flight;
                # what they do not use comes back when they finish.
                "held": f"the token budget (limit {limits.budget_tokens}): what is left of"
                " it is reserved by this key's requests in flight",
            }[decision.reason]
            raise RateLimited(f"Rate limit reached for {what}.", headers, kind)
        return Ticket(tenant, model, cost, size, limits, local, headers)

    # -- what they used -------------------------------------------------------------------

    def settle_soon(
        self,
        ticket: Ticket,
        usage: Usage | None,
        error: ServingError | None,
        disconnected: bool,
        blocks: int,
        count: Callable[[], Awaitable[tuple[int, int] | None]] | None = None,
        sent: list[bytes] | None = None,
    ) -> None:
        """Settle in the background (called from the request's synchronous record). A
        stream cut before its usage chunk is counted by `count` (the model's tokenizer,
        `gateway.usage_count`) in that background task; where it cannot tell, the prompt
        is estimated from its bytes and the completion is the events in `sent` that
        carried text (else `blocks`, every event relayed)."""
        if ticket.settled:
            return
        ticket.settled = True
        how = outcome(usage, error, disconnected, blocks)
        if usage is None and how != "error" and count is not None:
            self._background(self._count_then_settle(ticket, how, blocks, count, sent))
            return
        self._settle_counted(ticket, how, *self._tokens(ticket, usage, how, blocks, sent))

    def _tokens(
        self,
        ticket: Ticket,
        usage: Usage | None,
        how: str,
        blocks: int,
        sent: list[bytes] | None,
    ) -> tuple[int, int]:
        ratio = self._ratio.get(ticket.model, BYTES_RATIO)
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            if ticket.prompt_bytes and prompt:
                ratio += 0.1 * (prompt / ticket.prompt_bytes - ratio)
                self._ratio[ticket.model] = ratio
            return prompt, completion
        if how == "error":
            return 0, 0
        # Aborted or failed mid-stream, and no tokenizer to ask: an estimate.
        carrying = streamed_text(sent)[1] if sent is not None else blocks
        return round(ticket.prompt_bytes * ratio), carrying

    async def _count_then_settle(
        self,
        ticket: Ticket,
        how: str,
        blocks: int,
        count: Callable[[], Awaitable[tuple[int, int] | None]],
        sent: list[bytes] | None,
    ) -> None:
        try:
            counted = await count()
        except Exception:  # a tokenizer failure must not lose the settlement
            log.exception("counting a cut stream's tokens failed; estimating")
            counted = None
        if counted is None:
            counted = self._tokens(ticket, None, how, blocks, sent)
        self._settle_counted(ticket, how, *counted)

    def _settle_counted(self, ticket: Ticket, how: str, prompt: int, completion: int) -> None:
        spent = Spent(ticket.model, ticket.reserved, prompt, completion, how, once=self._once())
        if self.metrics is not None:
            self.metrics.key_outcomes.labels(ticket.model, how).inc()
            self.metrics.key_used(ticket.tenant.key_id, prompt, completion)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        key_id = ticket.tenant.key_id
        if ticket.local:
            self.local.settle_now(key_id, ticket.limits, spent, day)
            # The ledger still belongs in the store: without the limiter part, queued
            # while the store is skipped, else written now (a request admitted locally
            # just before the store came back).
            ledger = (key_id, Limits(), _ledger_only(spent), day)
            if self._skip_store():
                self._pending.append(ledger)
            else:
                self._background(self._settle(*ledger))
            return
        self._background(self._settle(key_id, ticket.limits, spent, day))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _once(self) -> str:
        """A new settlement id, "epoch/n": the store writes a settlement retried under the
        same id once (`gateway.state_store.redis`, behind Sentinel)."""
        if self._seq >= ONCE_PER_EPOCH:
            self._epoch, self._seq = uuid.uuid4().hex[:16], 0
        self._seq += 1
        return f"{self._epoch}/{self._seq}"

    async def _settle(self, key_id: str, limits: Limits, spent: Spent, day: str) -> None:
        try:
            await self.store.settle(key_id, limits, spent, day)
        except StoreUnavailable as e:
            self._mark(True, str(e))
            self._pending.append((key_id, limits, spent, day))
            return
        if self._pending:
            await self.flush()

    async def flush(self) -> None:
        """Write the settlements queued while the store did not answer."""
        pending, self._pending = self._pending, []
        for i, (key_id, limits, spent, day) in enumerate(pending):
            try:
                await self.store.settle(key_id, limits, spent, day)
            except StoreUnavailable:
                self._pending.extend(pending[i:])
                return

    async def quiesce(self) -> None:
        """Wait for every settlement in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        with contextlib.suppress(StoreUnavailable):
            await self.flush()


def _usable(tenant: Tenant) -> Tenant:
    """The tenant, unless its key is revoked or expired (OpenAI's 401 invalid_api_key)."""
    if tenant.record.revoked:
        raise AuthenticationError("This API key has been revoked.")
    if tenant.record.expired(time.time()):
        raise AuthenticationError("This API key has expired.")
    return tenant


def _eq(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a, b)


def _share(limits: Limits, n: int, keep_budget: bool = False) -> Limits:
    """Each of n deciders' part of the limits. The budget is a lifetime total counted where
    it is stored: kept as is for a process's own store, off while Redis is away."""
    if n <= 1:
        return limits

    def part(v: int) -> int:
        return max(1, v // n) if v else 0

    budget = limits.budget_tokens if keep_budget else 0
    return Limits(part(limits.rpm), part(limits.tpm), part(limits.max_parallel), budget)


def _ledger_only(spent: Spent) -> Spent:
    """A settlement that writes the ledger and the spent budget but releases nothing."""
    return Spent(
        spent.model,
        0,
        spent.prompt_tokens,
        spent.completion_tokens,
        spent.outcome,
        release=False,
        once=spent.once,
    )
