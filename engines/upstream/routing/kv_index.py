"""The KV index of one model: which workers hold which token blocks, as their own KV-cache
events said.

Owns `KVIndex`: per worker, its block hashes (the worker's own, from the events) → the
gateway's block keys (`kv_blocks`), and per key the set of workers holding it (a bit mask);
applying `BlockStored` / `BlockRemoved` / `AllBlocksCleared`; clearing a worker whose
stream cannot be trusted (a restart, a gap replay could not fill, an overflow); and the
lookup: for the request's block keys, how many leading blocks each worker holds. Does not
own the wire (`kv_events`: sockets, decoding, sequence numbers, replay), tokenization
(`kv_tokens`) or scoring (`kv_cache_hit`).

What the events carry (vLLM's `vllm/distributed/kv_events.py`): `BlockStored` —
`block_hashes` (one per full block, chained), `parent_block_hash` (the block before the
first, None at the start of a sequence), `token_ids` (all blocks' tokens, `block_size`
each), `lora_name`, `extra_keys` (per block: LoRA name, multimodal hashes, cache_salt on
the first block), `group_idx` (KV-cache group, hybrid models); `BlockRemoved` —
`block_hashes`; `AllBlocksCleared`. A stored block whose parent the index does not know
(its store was lost) cannot be keyed: it is counted as an orphan and skipped. Only group 0
(or no group) is indexed: it is the full-attention group whose prefix decides a hit.

Matching is vLLM's: only leading blocks count (a worker's prefix cache hits a contiguous
prefix); `match` finds the end of each worker's held prefix by binary search.

Memory is bounded: a worker with more than `max_blocks` entries (lost removals, or a cache
bigger than configured) is cleared and rebuilt from its next events (`overflows`); `size()`
and `nbytes()` report it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.upstream.routing.kv_blocks import BlockHasher, extra_seed

__all__ = ["BlockRemoved", "BlockStored", "Cleared", "KVIndex"]


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[Any]
    parent: Any
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[Any]
    group_idx: int | None = None


@dataclass(slots=True)
class Cleared:
    pass


Event = BlockStored | BlockRemoved | Cleared


@dataclass(slots=True)
class _Worker:
    bit: int
    # The worker's block hash → the gateway's key of that block.
    blocks: dict[Any, int] = field(default_factory=dict)
    # Keys expected (a request was just sent there) and not yet confirmed by an event →
    # when to stop expecting them (loop time), oldest first.
    pending: dict[int, float] = field(default_factory=dict)


class KVIndex:
    """Which workers (by slot 0..n-1) hold which blocks."""

    def __init__(self, block_size: int = 16, max_blocks: int = 1 << 19) -> None:
        self.hasher = BlockHasher(block_size)
        self.max_blocks = max_blocks
        self._workers: dict[int, _Worker] = {}
        # key → bit mask of the workers holding it.
        self.holders: dict[int, int] = {}
        self.orphans = 0
        self.overflows = 0
        self.size_mismatches = 0

    @property
    def block_size(self) -> int:
        return self.hasher.block_size

    def _worker(self, slot: int) -> _Worker:
        w = self._workers.get(slot)
        if w is None:
            w = self._workers[slot] = _Worker(1 << slot)
        return w

    # ------------------------------------------------------------------ events

    def apply(self, slot: int, events: Sequence[Event]) -> None:
        w = self._worker(slot)
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(w, ev)
            elif isinstance(ev, BlockRemoved):
                if ev.group_idx:
                    continue
                self._removed(w, ev.block_hashes)
            else:
                self.clear(slot)
        if len(w.blocks) > self.max_blocks:
            self.overflows += 1
            self.clear(slot)

    def _stored(self, w: _Worker, ev: BlockStored) -> None:
        if ev.group_idx:
            return
        if ev.block_size != self.hasher.block_size:
            if self.holders:  # a size change with blocks indexed: they cannot be compared
                self.size_mismatches += 1
                return
            self.hasher = BlockHasher(ev.block_size)
        if ev.parent is None:
            first = ev.extra_keys[0] if ev.extra_keys else None
            if first is None and ev.lora_name:
                first = (ev.lora_name,)
            key = extra_seed(first)
        else:
            parent = w.blocks.get(ev.parent)
            if parent is None:
                self.orphans += len(ev.block_hashes)
                return
            key = parent
        contents = self.hasher.contents(ev.token_ids).tolist()
        extras = ev.extra_keys
        lora = ev.lora_name
        holders, bit, blocks, pending = self.holders, w.bit, w.blocks, w.pending
        step = BlockHasher.step
        for i, (h, c) in enumerate(zip(ev.block_hashes, contents, strict=False)):
            if extras is not None and i < len(extras):
                extra = extras[i]
                # Beyond the LoRA name (every block) and the salt (the first block of a
                # sequence, folded into the seed above): multimodal or embedding keys,
                # which a text request never matches.
                if extra and (ev.parent is not None or i > 0):
                    rest = [e for e in extra if e != lora]
                    if rest:
                        c ^= extra_seed(rest)
            key = step(key, c)
            if h in blocks:
                continue
            blocks[h] = key
            holders[key] = holders.get(key, 0) | bit
            pending.pop(key, None)

    def _removed(self, w: _Worker, hashes: Sequence[Any]) -> None:
        holders, bit, blocks = self.holders, w.bit, w.blocks
        for h in hashes:
            key = blocks.pop(h, None)
            if key is None:
                continue
            m = holders.get(key, 0) & ~bit
            if m:
                holders[key] = m
            else:
                holders.pop(key, None)

    def clear(self, slot: int) -> None:
        """Forget everything `slot` holds (AllBlocksCleared, a restart, an untrusted gap)."""
        w = self._workers.get(slot)
        if w is None:
            return
        self._removed(w, list(w.blocks))
        self._unexpect(w, list(w.pending))

    # ------------------------------------------------------------------ expectations

    def expect(self, slot: int, keys: Sequence[int], now: float, ttl: float) -> None:
        """The worker at `slot` was just sent a prompt with these blocks: count them as
        held until its events confirm them, or for `ttl` seconds. Why: between the send
        and the worker's `BlockStored` (its next scheduler step, later under load) the next
        request with the same new prefix would otherwise be placed elsewhere and prefill
        it twice. Keys it holds already are left alone (never expired)."""
        if not keys:
            return
        w = self._worker(slot)
        bit, holders = w.bit, self.holders
        fresh = dict.fromkeys(keys, bit)
        for k in holders.keys() & fresh.keys():
            m = holders[k]
            if m & bit:
                del fresh[k]
            else:
                fresh[k] = m | bit
        holders.update(fresh)
        w.pending.update(dict.fromkeys(fresh, now + ttl))

    def expire(self, now: float) -> None:
        """Drop the expectations whose time is up and that no event confirmed."""
        for w in self._workers.values():
            p = w.pending
            if not p:
                continue
            gone = []
            for k, until in p.items():
                if until > now:
                    break
                gone.append(k)
            if gone:
                self._unexpect(w, gone)

    def _unexpect(self, w: _Worker, keys: Sequence[int]) -> None:
        holders, bit, p = self.holders, w.bit, w.pending
        for k in keys:
            p.pop(k, None)
            m = holders.get(k, 0) & ~bit
            if m:
                holders[k] = m
            else:
                holders.pop(k, None)

    # ------------------------------------------------------------------ lookup

    def match(self, keys: Sequence[int], slots: Sequence[int]) -> list[int]:
        """For each slot, how many of `keys` (in order, from the first) its worker holds.

        A binary search per worker for the end of its held prefix: a worker's blocks along
        one chain are prefix-closed (a block is stored after its parent, and vLLM frees a
        request's blocks tail first, so a parent is evicted after its children), so
        "holds block i" is true up to some i and false after. Measured 9 µs for 512 keys
        and 4 workers against 60-80 µs for a walk over every key (docs/benchmarks.md,
        "KV-cache routing"), on a path with a 200 µs budget at 8k tokens. Where a worker's
        blocks are not prefix-closed (a removal lost while a later store arrived), the
        answer is some boundary of its held runs: a routing hint off by a few blocks."""
        get = self.holders.get
        n = len(keys)
        out = []
        for s in slots:
            bit = 1 << s
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi) >> 1
                if get(keys[mid], 0) & bit:
                    lo = mid + 1
                else:
                    hi = mid
            out.append(lo)
        return out

    # ------------------------------------------------------------------ size

    def size(self, slot: int | None = None) -> int:
        """Blocks indexed (for one worker, or all)."""
        if slot is not None:
            w = self._workers.get(slot)
            return len(w.blocks) if w is not None else 0
        return sum(len(w.blocks) for w in self._workers.values())

    def nbytes(self) -> int:
        """Memory held, estimated: the tables plus ~2 int objects per entry."""
        tables = sys.getsizeof(self.holders) + sum(
            sys.getsizeof(w.blocks) for w in self._workers.values()
        )
        pending = sum(len(w.pending) for w in self._workers.values())
        return tables + 64 * self.size() + 32 * len(self.holders) + 100 * pending
