"""The simulator's cost model: what makes one worker faster than another for a request.

Owns `PrefixCache` (a per-worker cache of prompt blocks, like vLLM's automatic prefix
caching: a prompt's leading blocks of `BLOCK` tokens that an earlier prompt already had are
"cached" and cost no prefill; keyed and reported as vLLM keys and reports them),
`prompt_words` (the prompt's words, the simulator's tokens) and `token_ids` (their ids),
both `simulator.tokens`' (one rule for /tokenize, the usage and the prefix cache).
With `prefill_ms_per_token` set, TTFT = ttft_ms + prefill_ms_per_token × the uncached
prompt tokens. Adapter costs (a load delay, a per-worker limit) are config knobs
applied by the LoRA API (`simulator.behaviour`, `simulator.connection`). Does not own the
clock or the wire.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from simulator.tokens import counted_words as prompt_words
from simulator.tokens import token_ids

__all__ = ["BLOCK", "PrefixCache", "prompt_words", "token_ids"]

BLOCK = 16


class PrefixCache:
    """Prompt blocks a worker holds, least recently used first; `capacity_tokens` bounds it.

    Blocks are keyed as vLLM keys them (`vllm/v1/core/kv_cache_utils.py`,
    `hash_block_tokens` with its default `sha256`): sha256 of the pickle of `(parent hash,
    the block's token ids, extra keys)`, the first block's parent a random `NONE_HASH`
    drawn per start (vLLM's without PYTHONHASHSEED); extra keys are the LoRA name on every
    block and `cache_salt` on the first, in that order, or None. A lookup touches a hit
    chain tail first, so the LRU end holds chain tails (vLLM frees a request's blocks in
    reverse for the same reason: a parent outlives its children). With `publish` set,
    every change is handed to it as vLLM's events (`simulator.kv_events`): one
    `BlockStored` per run of newly cached blocks, one `BlockRemoved` for the evicted.
    """

    __slots__ = ("blocks", "capacity", "hit_tokens", "none_hash", "publish", "query_tokens")

    def __init__(
        self, capacity_tokens: int, publish: Callable[[list[dict[str, Any]]], None] | None = None
    ) -> None:
        self.capacity = max(1, capacity_tokens // BLOCK)
        self.blocks: OrderedDict[bytes, None] = OrderedDict()
        self.none_hash = os.urandom(32)
        self.publish = publish
        self.query_tokens = 0
        self.hit_tokens = 0

    def lookup_insert(
        self, ids: list[int], lora: str | None = None, salt: str | None = None
    ) -> int:
        """Tokens of `ids` already cached (leading whole blocks); caches the rest."""
        blocks = self.blocks
        parent = self.none_hash
        cached = 0
        hitting = True
        chain: list[bytes] = []
        events: list[dict[str, Any]] = []
        run: list[tuple[bytes, int, tuple[str, ...] | None]] = []
        run_parent: bytes | None = None
        full = len(ids) - len(ids) % BLOCK
        for i in range(0, full, BLOCK):
            keys = ([lora] if lora else []) + ([salt] if i == 0 and salt else [])
            extra = tuple(keys) if keys else None
            h = hashlib.sha256(
                pickle.dumps((parent, tuple(ids[i : i + BLOCK]), extra), pickle.HIGHEST_PROTOCOL)
            ).digest()
            if h in blocks:
                if hitting:
                    cached += BLOCK
                if run:
                    events.append(_stored(run, run_parent, ids, lora))
                    run = []
            else:
                hitting = False
                blocks[h] = None
                if not run:
                    run_parent = None if i == 0 else parent
                run.append((h, i, extra))
            chain.append(h)
            parent = h
        if run:
            events.append(_stored(run, run_parent, ids, lora))
        for h in reversed(chain):
            blocks.move_to_end(h)
        evicted = []
        while len(blocks) > self.capacity:
            evicted.append(blocks.popitem(last=False)[0])
        if evicted:
            removed = [_ext(h) for h in evicted]
            events.append({"type": "BlockRemoved", "block_hashes": removed, "medium": "GPU"})
        if events and self.publish is not None:
            self.publish(events)
        self.query_tokens += len(ids)
        self.hit_tokens += cached
        return cached

    def clear(self) -> None:
        """Drop every block (vLLM's reset_prefix_cache): one AllBlocksCleared."""
        self.blocks.clear()
        if self.publish is not None:
            self.publish([{"type": "AllBlocksCleared"}])


def _ext(h: bytes) -> int:
    """vLLM's external form of a block hash (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, the
    default): its last 8 bytes as an integer."""
    return int.from_bytes(h, "big") & 0xFFFFFFFFFFFFFFFF


def _stored(
    run: list[tuple[bytes, int, tuple[str, ...] | None]],
    parent: bytes | None,
    ids: list[int],
    lora: str | None,
) -> dict[str, Any]:
    first = run[0][1]
    return {
        "type": "BlockStored",
        "block_hashes": [_ext(h) for h, _i, _e in run],
        "parent_block_hash": None if parent is None else _ext(parent),
        "token_ids": ids[first : first + BLOCK * len(run)],
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": lora,
        "extra_keys": [list(e) if e is not None else None for _h, _i, e in run],
    }
