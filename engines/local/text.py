"""Text-side helpers of the embedded engine: incremental detokenisation and stop strings.

Owns: turning a growing list of generated token ids into stable text deltas (never
splitting a multi-byte UTF-8 character, never emitting U+FFFD for an incomplete one) and
cutting the text at the first stop string while holding back any tail that could still
become one. Pure Python over a tokenizer's `decode`; no torch, no batching, no HTTP.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Detokenizer", "StopMatcher", "TextDecoder", "token_bytes_fn"]

# U+FFFD is what a byte-level tokenizer's decode yields for an incomplete UTF-8 sequence.
_REPLACEMENT = "\ufffd"
# How many prompt tokens seed the decode window, so tokenizers that drop a leading space
# when a piece is decoded alone (SentencePiece) still produce the right first delta.
_PROMPT_CONTEXT = 5


class TextDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer:
    """Incremental detokeniser with a sliding window (the scheme vLLM and TGI use).

    Decoding the whole output every step is O(n²); this decodes only the window from
    `prefix` (text already emitted) to the newest token and emits the difference, and
    waits while the window ends in an incomplete character.
    """

    __slots__ = ("_ids", "_prefix", "_read", "_tok")

    def __init__(self, tokenizer: TextDecoder, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that is now stable (maybe "")."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held at the end of generation, minus a dangling incomplete char."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        window = self._ids[self._prefix :]
        prefix_text = self._tok.decode(
            window[: self._read - self._prefix], skip_special_tokens=True
        )
        new_text = self._tok.decode(window, skip_special_tokens=True)
        if new_text.endswith(_REPLACEMENT):
            if not final:
                return ""  # an incomplete character: wait for its next byte
            new_text = new_text.rstrip(_REPLACEMENT)
        if len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta


class StopMatcher:
    """Cuts a text stream at the earliest stop string.

    `feed` returns the text that can be released now: everything except a tail that is a
    proper prefix of some stop string (it may still complete into one). On a match the
    text before the stop is released and `stopped` becomes true; the stop itself is never
    released, as OpenAI does.
    """

    __slots__ = ("_held", "_stops", "stopped")

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        buf = self._held + text
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buf[:cut]
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The held tail, released when generation ends for another reason."""
        out, self._held = self._held, ""
        return out


def token_bytes_fn(tokenizer: Any) -> Any:
    """A function id → (display string, UTF-8 bytes) for logprobs entries.

    Byte-level BPE vocabularies (GPT-2 style, SmolLM2's) spell raw bytes with printable
    stand-ins; mapping them back gives the token's true bytes even when it holds only
    part of a character. Other vocabularies fall back to the decoded text's bytes.
    """
    byte_decoder = _gpt2_byte_decoder()

    def fn(token_id: int) -> tuple[str, list[int]]:
        text: str = tokenizer.decode([token_id], skip_special_tokens=False)
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in byte_decoder for c in piece):
            raw = bytes(byte_decoder[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        return text, list(text.encode("utf-8"))

    return fn


def _gpt2_byte_decoder() -> dict[str, int]:
    # The inverse of GPT-2's `bytes_to_unicode` table.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
