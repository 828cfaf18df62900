"""The request's tokens, as the worker will see them: the tokenizers KV-cache routing may use.

Chosen per model in models.yaml (`routing.kv_events.tokenizer`):

    hf      the model's own tokenizer and chat template (transformers' AutoTokenizer from
            `routing.kv_events.tokenizer_path`, else the model path): chat messages are
            rendered with the template (`add_generation_prompt`) and encoded without
            special tokens, a completions prompt is encoded with them — what vLLM's
            OpenAI server does. What vLLM then keys its blocks by.
    words   the simulator's tokens: every whitespace-separated word of a chat message's
            text (of a completions prompt's strings; token-id prompts as their ids written
            out) in order, each word's id the CRC-32 of its UTF-8 bytes — what the
            simulator's own `POST /tokenize` answers (`simulator.tokens`) and its prefix
            cache keys blocks on; tests/engines/upstream/test_kv_routing.py holds the
            gateway to that answer over the wire.

Owns turning a body into token ids (a numpy array) and nothing else: the block keys are
`kv_blocks`', where the work runs (a thread for long prompts) `kv_cache_hit`'s. A body the
tokenizer cannot read (a template error, media parts) gives None: that request is routed
on load alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["TOKENIZERS", "HFTokens", "TokenIds", "Tokenizer", "WordTokens", "prompt_chars"]

TokenIds = npt.NDArray[np.int64]


class Tokenizer(Protocol):
    # Whether a long prompt is worth a thread: true where the work releases the GIL (the
    # Rust tokenizer); pure-Python work in a thread only takes the GIL from the event loop
    # (up to the 5 ms switch interval at a time).
    offload: bool

    def ids(self, route: str, body: dict[str, Any]) -> TokenIds | None: ...


def prompt_chars(body: dict[str, Any]) -> int:
    """A cheap size of the prompt (characters of its text), to decide where to tokenize."""
    messages = body.get("messages")
    n = 0
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, str):
                    n += len(c)
                elif isinstance(c, list):
                    n += sum(len(p.get("text") or "") for p in c if isinstance(p, dict))
        return n
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return 4 * len(prompt)
    return 0


class WordTokens:
    """The simulator's tokens (module docstring)."""

    offload = False

    def __init__(self, path: str | None = None) -> None:
        pass

    def ids(self, route: str, body: dict[str, Any]) -> TokenIds | None:
        words: list[str] = []
        _words(body.get("messages") if route == "chat" else body.get("prompt"), words)
        crc = zlib.crc32
        return np.fromiter((crc(w.encode()) for w in words), dtype=np.int64, count=len(words))


def _words(value: Any, out: list[str]) -> None:
    # The simulator's word rule (`simulator.tokens.counted_words`), written again on
    # purpose: engines may not import the simulator, and the two meet only over the wire
    # (a test holds this rule equal to the simulator's /tokenize).
    if isinstance(value, str):
        out.extend(value.split())
    elif isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            out.extend(map(str, value))
        else:
            for v in value:
                _words(v, out)
    elif isinstance(value, dict):
        for k in ("content", "text"):
            v = value.get(k)
            if v is not None:
                _words(v, out)


class HFTokens:
    """The model's own tokenizer and chat template (module docstring). Loaded on first use,
    in the thread that tokenizes, so the gateway starts without reading it."""

    offload = True

    def __init__(self, path: str | None) -> None:
        if not path:
            raise ValueError("tokenizer hf needs a path (routing.kv_events.tokenizer_path)")
        self.path = path
        self._tok: Any = None

    def load(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path)
        return self._tok

    def ids(self, route: str, body: dict[str, Any]) -> TokenIds | None:
        tok = self.load()
        try:
            if route == "chat":
                text = tok.apply_chat_template(
                    body.get("messages") or [], tokenize=False, add_generation_prompt=True
                )
                special = False
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                    return np.asarray(prompt, dtype=np.int64)
                if isinstance(prompt, list):
                    prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
                if not isinstance(prompt, str):
                    return None
                text, special = prompt, True
            enc = tok(text, add_special_tokens=special, return_tensors="np")
        except Exception:  # a template that refuses these messages: route on load
            return None
        ids: TokenIds = enc["input_ids"][0].astype(np.int64, copy=False)
        return ids


TOKENIZERS: dict[str, Callable[[str | None], Tokenizer]] = {
    "hf": HFTokens,
    "words": WordTokens,
}
