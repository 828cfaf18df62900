"""Shared state behind one small interface, with two backends.

`StateStore` is everything more than one gateway process must agree on: API key records,
the limiter's decisions (one atomic step each), the usage ledger, and small named maps
(adapter desired state, routing affinity). `MemoryStore` keeps it in this process (the
default: one process, no Redis); `RedisStore` keeps it in Redis (`GATEWAY_REDIS_URL`),
every decision one Lua script, every call bounded by a timeout (`GATEWAY_REDIS_TIMEOUT_MS`,
≤ 50 ms by default). What to do when Redis does not answer (fail closed or decide locally
at limit ÷ N) is `gateway.limits`' policy, not the store's: a store raises `StoreUnavailable`.

Not here: what a key may do (`gateway.keys`), HTTP headers and errors (`gateway.limits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Decision",
    "Limits",
    "StateStore",
    "StoreUnavailable",
    "Usage",
]

# Every limit is a GCRA bucket whose capacity is one minute's worth of the limit.
WINDOW_MS = 60_000.0


class StoreUnavailable(Exception):
    """The backend did not answer in time or refused: the caller applies its outage policy."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits for one decision; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0
    budget_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer. `reason` is "" when admitted, else "budget" (spent, or what is
    left is less than this request's prompt: retrying will not help), "held" (the rest of
    the budget is reserved by requests in flight: it may come back when they settle),
    "parallel", "requests", "tokens", or "stale" (the key's record changed since the caller
    read it: read it again, decide again); times are milliseconds from now."""

    reason: str
    retry_after_ms: int
    remaining_requests: int
    reset_requests_ms: int
    remaining_tokens: int
    reset_tokens_ms: int

    @property
    def admitted(self) -> bool:
        return not self.reason


@dataclass(frozen=True, slots=True)
class Usage:
    """What one finished request used, for the settlement and the ledger."""

    model: str
    reserved: int
    prompt_tokens: int
    completion_tokens: int
    outcome: str  # full | partial | aborted | error
    # False: only the ledger and the spent budget (the reservation was decided elsewhere).
    release: bool = True
    # "epoch/n": a store may write a settlement retried under the same id only once.
    once: str = ""


class StateStore(Protocol):
    """The shared state. Every method may raise `StoreUnavailable`."""

    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    # API keys: id → the record's JSON (hashes only; `gateway.keys` owns the format) and
    # its version, which every `put_key` changes.
    async def get_key(self, key_id: str) -> tuple[str, str] | None: ...
    async def put_key(self, key_id: str, record: str) -> None: ...
    async def list_keys(self) -> dict[str, str]: ...

    # Limits: one atomic decision at admission, one atomic settlement at the end. A
    # non-empty `version` that is not the record's current one answers "stale". `cost` is
    # what the request reserves (prompt + max_tokens), `prompt` its prompt part: the budget
    # admits it while spent + reserved by requests in flight + prompt ≤ budget, so a key
    # ends at most one request's max_tokens over its budget (issue 25).
    async def admit(
        self,
        key_id: str,
        limits: Limits,
        cost: int,
        now_ms: float,
        version: str = "",
        prompt: int = 0,
    ) -> Decision: ...
    async def settle(self, key_id: str, limits: Limits, usage: Usage, day: str) -> None: ...
    async def outstanding(self, key_id: str) -> tuple[int, int]:
        """(requests in flight, tokens reserved and not yet settled) for one key."""
        ...

    # The usage ledger: day → "model\x1ffield" → count.
    async def usage(self, key_id: str) -> dict[str, dict[str, int]]: ...

    # Small named maps (adapter desired state, affinity): name → field → value.
    async def map_set(self, name: str, field: str, value: str) -> None: ...
    async def map_delete(self, name: str, field: str) -> None: ...
    async def map_all(self, name: str) -> dict[str, str]: ...


def usage_field(model: str, field: str) -> str:
    return f"{model}\x1f{field}"
