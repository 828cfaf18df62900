"""The usage of a stream that ended before its usage chunk (the client left, or the worker
failed mid-stream), counted with the model's own tokenizer.

Owns reading what the client was sent out of the relayed SSE blocks (the text of every
choice's deltas: content, reasoning, tool-call arguments; a role-only or empty event
carries no token) and counting it, and the prompt, through the engine's `/tokenize` (the
worker's own tokenizer and chat template for vLLM, SGLang and the simulator; the embedded
engine's tokenizer in process). Runs in the settlement's background task, never on the
request path. Does not own settlement or the ledger (`gateway.limits`), nor the estimate
used when the engine cannot tokenize (`streamed_text` still tells how many events carried
text).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from engines.base import Engine, ServingError

__all__ = ["exact_usage", "streamed_text"]


def _choice_text(choice: dict[str, Any]) -> str:
    text = choice.get("text")
    if isinstance(text, str):  # /v1/completions
        return text
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return ""
    parts = [
        v
        for k in ("content", "reasoning_content", "reasoning")
        if isinstance(v := delta.get(k), str)
    ]
    for call in delta.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            parts += [v for k in ("name", "arguments") if isinstance(v := fn.get(k), str)]
    return "".join(parts)


def streamed_text(blocks: Iterable[bytes]) -> tuple[str, int]:
    """(the generated text in the relayed `blocks`, how many events carried any)."""
    parts: list[str] = []
    carrying = 0
    for block in blocks:
        for event in block.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            try:
                obj = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            texts = [_choice_text(c) for c in obj.get("choices") or () if isinstance(c, dict)]
            if any(texts):
                carrying += 1
                parts += texts
    return "".join(parts), carrying


async def _count(engine: Engine, model: str, prompt: Any) -> int | None:
    if isinstance(prompt, str):
        answer = await engine.tokenize({"model": model, "prompt": prompt})
        return int(answer["count"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids already
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        total = 0
        for p in prompt:
            total += int((await engine.tokenize({"model": model, "prompt": p}))["count"])
        return total
    return None


async def exact_usage(
    engine: Engine, body: dict[str, Any], chat: bool, blocks: Iterable[bytes]
) -> tuple[int, int] | None:
    """(prompt tokens, completion tokens) of a cut stream by the model's tokenizer, or None
    when the engine cannot tell (no /tokenize, a worker gone): the caller estimates then."""
    model = str(body.get("model"))
    text, _ = streamed_text(blocks)
    try:
        if chat:
            answer = await engine.tokenize(
                {"model": model, "messages": body.get("messages") or [],
                 "add_generation_prompt": True}
            )  # fmt: skip
            prompt: int | None = int(answer["count"])
        else:
            prompt = await _count(engine, model, body.get("prompt"))
        if prompt is None:
            return None
        completion = 0
        if text:
            answer = await engine.tokenize(
                {"model": model, "prompt": text, "add_special_tokens": False}
            )
            completion = int(answer["count"])
    except (ServingError, KeyError, TypeError, ValueError):
        return None
    return prompt, completion
