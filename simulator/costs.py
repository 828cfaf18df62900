"""The simulator's cost model: what makes one worker faster than another for a request.

Owns `PrefixCache` (a per-worker cache of prompt blocks, like vLLM's automatic prefix
caching: a prompt's leading blocks of `BLOCK` words that an earlier prompt already had are
"cached" and cost no prefill) and `prompt_words` (the prompt's words, the simulator's
tokens). With `prefill_ms_per_token` set, TTFT = ttft_ms + prefill_ms_per_token × the
uncached prompt tokens. Adapter costs (a load delay, a per-worker limit) are config knobs
applied by the LoRA API (`simulator.behaviour`, `simulator.connection`). Does not own the
clock or the wire.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["BLOCK", "PrefixCache", "prompt_words"]

BLOCK = 16


def prompt_words(value: Any) -> list[str]:
    """The words of every string in a prompt or a messages list, in order (token-id lists
    count as their ids)."""
    out: list[str] = []
    _collect(value, out)
    return out


def _collect(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.extend(value.split())
    elif isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            out.extend(map(str, value))
        else:
            for v in value:
                _collect(v, out)
    elif isinstance(value, dict):
        for k in ("role", "content", "text"):
            v = value.get(k)
            if v is not None:
                _collect(v, out)


class PrefixCache:
    """Prompt blocks a worker holds, least recently used first; `capacity_tokens` bounds it."""

    __slots__ = ("blocks", "capacity", "hit_tokens", "query_tokens")

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = max(1, capacity_tokens // BLOCK)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.query_tokens = 0
        self.hit_tokens = 0

    def lookup_insert(self, words: list[str]) -> int:
        """Tokens of `words` already cached (leading whole blocks); caches the rest."""
        blocks = self.blocks
        h = 0
        cached = 0
        hitting = True
        full = len(words) - len(words) % BLOCK
        for i in range(0, full, BLOCK):
            h = hash((h, *words[i : i + BLOCK]))
            if hitting and h in blocks:
                cached += BLOCK
                blocks.move_to_end(h)
            else:
                hitting = False
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        self.query_tokens += len(words)
        self.hit_tokens += cached
        return cached
