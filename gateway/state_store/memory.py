"""`MemoryStore`: the shared state in this process's memory (the single-process default).

Also the local decider while Redis is unreachable under the "local" outage policy
(`gateway.limits` hands it each key's limits ÷ N). The limiter is the same GCRA as the
Redis scripts (`gateway.state_store.redis`), written once more in Python; a test checks the
two agree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from gateway.state_store import WINDOW_MS, Decision, Limits, Usage, usage_field


@dataclass(slots=True)
class _Bucket:
    rtat: float = 0.0
    ttat: float = 0.0
    parallel: int = 0
    reserved: int = 0
    spent: int = 0


def gcra_admit(
    b: _Bucket, limits: Limits, cost: int, now: float, prompt: int = 0
) -> tuple[Decision, float, float]:
    """The decision and, when admitted, the new request and token TATs."""
    rtat = max(b.rtat, now)
    ttat = max(b.ttat, now)
    rem_r = rem_t = -1
    rnew, tnew = rtat, ttat
    reason, retry = "", 0.0
    budget = limits.budget_tokens
    if budget and (b.spent >= budget or b.spent + prompt > budget):
        reason, retry = "budget", -1.0
    elif budget and b.spent + b.reserved + prompt > budget:
        reason, retry = "held", 1000.0
    elif limits.max_parallel and b.parallel >= limits.max_parallel:
        reason, retry = "parallel", 1000.0
    else:
        if limits.rpm:
            rnew = rtat + WINDOW_MS / limits.rpm
            if rnew - now > WINDOW_MS:
                reason, retry = "requests", rnew - now - WINDOW_MS
        if not reason and limits.tpm:
            tnew = ttat + min(cost, limits.tpm) * WINDOW_MS / limits.tpm
            if tnew - now > WINDOW_MS:
                reason, retry = "tokens", tnew - now - WINDOW_MS
    if reason:
        rnew, tnew = rtat, ttat
    if limits.rpm:
        rem_r = int((WINDOW_MS - (rnew - now)) * limits.rpm / WINDOW_MS)
    if limits.tpm:
        rem_t = int((WINDOW_MS - (tnew - now)) * limits.tpm / WINDOW_MS)
    d = Decision(reason, int(retry), rem_r, int(rnew - now), rem_t, int(tnew - now))
    return d, rnew, tnew


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}
        self._versions: dict[str, int] = defaultdict(int)
        self._buckets: dict[str, _Bucket] = defaultdict(_Bucket)
        self._usage: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )
        self._maps: dict[str, dict[str, str]] = defaultdict(dict)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def get_key(self, key_id: str) -> tuple[str, str] | None:
        raw = self._keys.get(key_id)
        return None if raw is None else (raw, str(self._versions[key_id]))

    async def put_key(self, key_id: str, record: str) -> None:
        self._keys[key_id] = record
        self._versions[key_id] += 1

    async def list_keys(self) -> dict[str, str]:
        return dict(self._keys)

    def admit_now(
        self, key_id: str, limits: Limits, cost: int, now_ms: float, prompt: int = 0
    ) -> Decision:
        b = self._buckets[key_id]
        d, rnew, tnew = gcra_admit(b, limits, cost, now_ms, prompt)
        if d.admitted:
            b.rtat, b.ttat = rnew, tnew
            b.parallel += 1
            b.reserved += cost
        return d

    async def admit(
        self,
        key_id: str,
        limits: Limits,
        cost: int,
        now_ms: float,
        version: str = "",
        prompt: int = 0,
    ) -> Decision:
        if version and version != str(self._versions[key_id]):
            return Decision("stale", 0, 0, 0, 0, 0)
        return self.admit_now(key_id, limits, cost, now_ms, prompt)

    def settle_now(self, key_id: str, limits: Limits, usage: Usage, day: str) -> None:
        b = self._buckets[key_id]
        used = usage.prompt_tokens + usage.completion_tokens
        b.spent += used
        if usage.release:
            b.parallel = max(0, b.parallel - 1)
            b.reserved -= usage.reserved
        if usage.release and limits.tpm:
            refund = min(usage.reserved, limits.tpm) - min(used, limits.tpm)
            b.ttat -= refund * WINDOW_MS / limits.tpm
        ledger = self._usage[key_id][day]
        ledger[usage_field(usage.model, "prompt_tokens")] += usage.prompt_tokens
        ledger[usage_field(usage.model, "completion_tokens")] += usage.completion_tokens
        ledger[usage_field(usage.model, f"requests_{usage.outcome}")] += 1

    async def settle(self, key_id: str, limits: Limits, usage: Usage, day: str) -> None:
        self.settle_now(key_id, limits, usage, day)

    async def outstanding(self, key_id: str) -> tuple[int, int]:
        b = self._buckets.get(key_id)
        return (b.parallel, b.reserved) if b is not None else (0, 0)

    async def usage(self, key_id: str) -> dict[str, dict[str, int]]:
        return {day: dict(fields) for day, fields in self._usage.get(key_id, {}).items()}

    async def map_set(self, name: str, field: str, value: str) -> None:
        self._maps[name][field] = value

    async def map_delete(self, name: str, field: str) -> None:
        self._maps[name].pop(field, None)

    async def map_all(self, name: str) -> dict[str, str]:
        return dict(self._maps.get(name, {}))
