"""The simulator's tokenizer, behind vLLM's `POST /tokenize` and `POST /detokenize` (their
handlers are `simulator.behaviour.tokenize` / `detokenize`; this module imports neither
the behaviour nor the state, which both use it).

A token is a word: exactly the words `simulator.wire.count_words` counts for a request's
`usage.prompt_tokens` (every string's whitespace-separated words; in messages, only
`content` and `text`, never the role), so `/tokenize`'s `count` is the prompt tokens the
same prompt is billed. Like the usage, a prompt without a word is one token (id 0, the
empty string). The chat template adds nothing and there are no special tokens:
`add_generation_prompt` and `add_special_tokens` are accepted and change nothing.

A word's id is its CRC-32 (stable across processes and workers; the prefix cache keys
blocks on the same ids, `simulator.costs.token_ids`). `Vocab` remembers which word each
id it handed out stands for, in a bounded least-recently-used map, so `/detokenize` inverts
what `/tokenize` produced in this process (and the configured output words always); an id
it does not hold is answered 400 like an id outside a real vocabulary.

Request and response shapes are vLLM's (`vllm/entrypoints/serve/tokenize/protocol.py`):
tokenize takes `prompt` (a string) or chat `messages` (+ `add_generation_prompt`,
`continue_final_message`, `add_special_tokens`, `return_token_strs`) and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; detokenize takes `tokens` and answers
`{"prompt"}` (the words joined by one space).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

__all__ = ["EMPTY_ID", "MAX_ID", "Vocab", "counted_words", "token_ids", "word_id"]

# The one token of a prompt without a word (the usage counts such a prompt as one token).
EMPTY_ID = 0
# Words remembered for /detokenize (each entry a few dozen bytes).
VOCAB_SIZE = 65536
MAX_ID = 2**63 - 1  # vLLM's bound on a token id


def word_id(word: str) -> int:
    return zlib.crc32(word.encode())


def token_ids(words: list[str]) -> list[int]:
    """The simulator's token ids: each word's CRC-32 (the gateway's `words` tokenizer,
    `engines.upstream.routing.kv_tokens`, computes the same from a request body)."""
    crc = zlib.crc32
    return [crc(w.encode()) for w in words]


def counted_words(value: Any) -> list[str]:
    """The words `count_words` counts, in order: the simulator's prompt tokens."""
    out: list[str] = []
    _collect(value, out)
    return out


def _collect(value: Any, out: list[str]) -> None:
    # Mirrors simulator.wire.count_words branch for branch (a test holds them equal).
    if isinstance(value, str):
        out.extend(value.split())
    elif isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            out.extend(map(str, value))
        else:
            for v in value:
                _collect(v, out)
    elif isinstance(value, dict):
        for k in ("content", "text"):
            _collect(value.get(k), out)


class Vocab:
    """id → word for the ids this simulator handed out; the output words stay for good."""

    __slots__ = ("_fixed", "_seen", "capacity")

    def __init__(self, words: Iterable[str], capacity: int = VOCAB_SIZE) -> None:
        self._fixed = {word_id(w): w for w in words}
        self._fixed[EMPTY_ID] = ""
        self._seen: OrderedDict[int, str] = OrderedDict()
        self.capacity = capacity

    def ids(self, words: list[str]) -> list[int]:
        if not words:
            return [EMPTY_ID]
        seen = self._seen
        out = []
        for w in words:
            i = word_id(w)
            out.append(i)
            if self._fixed.get(i) == w:
                continue
            seen[i] = w
            seen.move_to_end(i)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        return out

    def word(self, i: int) -> str | None:
        w = self._seen.get(i)
        if w is not None:
            self._seen.move_to_end(i)
            return w
        return self._fixed.get(i)
