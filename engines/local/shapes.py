"""OpenAI response shapes for the embedded engine.

Owns: what one choice accumulates while it generates (`ChoiceState`), and turning that
into OpenAI's exact bodies and chunks: response ids, usage objects, chat and completion
bodies, SSE framing of stream chunks, logprobs objects (chat's `content` list and
completions' parallel arrays) and the embeddings list. Does not own generation, prompts or
validation (`engines.local.engine`, `engines.local.prompts`); imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from engines.base import GenerateRequest, Usage
from engines.local.structured import parse_call

if TYPE_CHECKING:
    from engines.local.batcher import SeqEvent, TokenLogprob

__all__ = [
    "ChoiceState",
    "TokenInfo",
    "chunks_for",
    "completion_body",
    "embeddings_body",
    "logprobs_obj",
    "response_id",
    "sse",
    "stream_head",
    "usage_obj",
]

# token id → (display string, UTF-8 bytes)
TokenInfo = Callable[[int], tuple[str, list[int]]]


@dataclass(slots=True)
class ChoiceState:
    """What the engine accumulates for one choice while it streams or completes."""

    index: int
    prompt_index: int
    echo: str = ""
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    started: bool = False
    offset: int = 0  # characters emitted so far (completions' text_offset)
    # Tools: None (no tools), "auto" (text or a call) or "call" (a call is certain).
    tool_mode: str | None = None
    tools: list[dict[str, Any]] | None = None
    # Whether the text is held back as a tool call (None: not known yet, "auto" mode).
    holding: bool | None = False

    def absorb(self, ev: SeqEvent) -> None:
        self.started = True
        if ev.text:
            if self.holding is None:  # the first byte decides: "<" opens `<tool_call>`
                self.holding = ev.text.startswith("<")
            self.text.append(ev.text)
            self.offset += len(ev.text)
        if ev.logprobs:
            self.logprobs.extend(ev.logprobs)
        self.completion_tokens = max(self.completion_tokens, ev.completion_tokens)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


def response_id(req: GenerateRequest) -> str:
    prefix = "chatcmpl-" if req.route == "chat" else "cmpl-"
    rid = req.request_id
    return rid if rid.startswith(prefix) else prefix + rid


def usage_obj(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_head(req: GenerateRequest) -> dict[str, Any]:
    """The fields every chunk of one stream repeats."""
    chat = req.route == "chat"
    return {
        "id": response_id(req),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": req.created,
        "model": req.model,
    }


def completion_body(
    req: GenerateRequest, choices: list[ChoiceState], usage: Usage, info: TokenInfo
) -> dict[str, Any]:
    """The non-streamed chat.completion / text_completion body."""
    chat = req.route == "chat"
    out: list[dict[str, Any]] = []
    for c in choices:
        text = c.echo + "".join(c.text)
        lp = logprobs_obj(info, chat, c.logprobs, c.echo) if c.logprobs else None
        if chat:
            msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            finish = c.finish_reason
            calls = parse_call(text, c.tools) if c.tools else None
            if calls:
                msg = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
                finish = "tool_calls" if finish == "stop" else finish
            out.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": finish})
        else:
            out.append(
                {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
            )
    return {
        "id": response_id(req),
        "object": "chat.completion" if chat else "text_completion",
        "created": req.created,
        "model": req.model,
        "choices": out,
        "usage": usage_obj(usage),
    }


def chunks_for(
    head: dict[str, Any],
    chat: bool,
    c: ChoiceState,
    ev: SeqEvent,
    first: bool,
    offset: int,
    info: TokenInfo,
) -> list[bytes]:
    """The SSE chunks one event of one choice becomes (role first, then content, then the
    finish reason in a chunk of its own, as OpenAI sends them)."""
    out: list[bytes] = []

    def chunk(choice: dict[str, Any]) -> None:
        # No `"usage": null` per chunk: the gateway always asks engines for the final
        # usage chunk, so the client's own choice is unknown here; like vLLM, leave
        # the field out of content chunks.
        out.append(sse({**head, "choices": [choice]}))

    lp = logprobs_obj(info, chat, ev.logprobs, "", offset) if ev.logprobs else None
    if chat:
        delta: dict[str, Any]
        if first:
            delta = {"role": "assistant", "content": "", "refusal": None}
            chunk({"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None})
        finish = ev.finish_reason
        if c.holding:  # a tool call: sent whole once it is complete
            if finish:
                text = "".join(c.text)
                calls = parse_call(text, c.tools) if c.tools else None
                if calls:
                    delta = {"tool_calls": [{"index": i, **tc} for i, tc in enumerate(calls)]}
                    finish = "tool_calls" if finish == "stop" else finish
                else:  # cut short by max_tokens: what there is, as text
                    delta = {"content": text}
                chunk({"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None})
        elif ev.text or lp:
            delta = {"content": ev.text}
            chunk({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None})
        if finish:
            chunk({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish})
    else:
        text = (c.echo if first else "") + ev.text
        if text or lp:
            chunk({"index": c.index, "text": text, "logprobs": lp, "finish_reason": None})
        if ev.finish_reason:
            chunk(
                {"index": c.index, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}
            )
    return out


def logprobs_obj(
    info: TokenInfo, chat: bool, lps: list[TokenLogprob], echo: str, offset: int = 0
) -> dict[str, Any]:
    """Chat's `{"content": [...]}` or completions' parallel arrays."""
    if chat:
        content = []
        for t in lps:
            tok, raw = info(t.token_id)
            top = []
            for tid, lp in t.top:
                s, b = info(tid)
                top.append({"token": s, "logprob": lp, "bytes": b})
            content.append({"token": tok, "logprob": t.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset + len(echo)
    for t in lps:
        tok, _ = info(t.token_id)
        tokens.append(tok)
        token_lps.append(t.logprob)
        tops.append({info(tid)[0]: lp for tid, lp in t.top})
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def embeddings_body(model: str, data: list[Any], n_tokens: int) -> dict[str, Any]:
    """The embeddings list; `data` holds one float list or base64 string per input."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
