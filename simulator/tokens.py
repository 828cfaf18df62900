"""The simulator's tokenizer and vLLM's `POST /tokenize` and `POST /detokenize`.

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
from typing import TYPE_CHECKING, Any

import orjson

from simulator.behaviour import check_model, json_body
from simulator.wire import HttpError

if TYPE_CHECKING:
    from simulator.state import SimState

__all__ = ["EMPTY_ID", "Vocab", "counted_words", "detokenize", "tokenize", "word_id"]

# The one token of a prompt without a word (the usage counts such a prompt as one token).
EMPTY_ID = 0
# Words remembered for /detokenize (each entry a few dozen bytes).
VOCAB_SIZE = 65536
MAX_ID = 2**63 - 1  # vLLM's bound on a token id


def word_id(word: str) -> int:
    return zlib.crc32(word.encode())


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


def _flag(req: dict[str, Any], name: str, default: bool) -> bool:
    value = req.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HttpError(400, f"'{name}' must be a boolean.")
    return value


def tokenize(s: SimState, body: bytes) -> bytes:
    req = json_body(body)
    check_model(s, req)
    if "messages" in req:
        messages = req["messages"]
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list.")
        # vLLM refuses the two together (only when both are sent as true).
        if _flag(req, "continue_final_message", False) and req.get("add_generation_prompt"):
            raise HttpError(
                400,
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            )
        _flag(req, "add_generation_prompt", True)
        _flag(req, "add_special_tokens", False)
        words = counted_words(messages)
    elif "prompt" in req:
        if not isinstance(req["prompt"], str):
            raise HttpError(400, "'prompt' must be a string.")
        _flag(req, "add_special_tokens", True)
        words = counted_words(req["prompt"])
    else:
        raise HttpError(400, "Either 'prompt' or 'messages' is required.")
    tokens = s.vocab.ids(words)
    strs = (words or [""]) if _flag(req, "return_token_strs", False) else None
    return orjson.dumps(
        {
            "count": len(tokens),
            "max_model_len": s.config.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }
    )


def detokenize(s: SimState, body: bytes) -> bytes:
    req = json_body(body)
    check_model(s, req)
    tokens = req.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_ID for t in tokens
    ):
        raise HttpError(400, "'tokens' must be a list of token ids (integers from 0).")
    words = []
    for t in tokens:
        w = s.vocab.word(t)
        if w is None:
            raise HttpError(400, f"Token id {t} is out of vocabulary.")
        if w:
            words.append(w)
    return orjson.dumps({"prompt": " ".join(words)})
