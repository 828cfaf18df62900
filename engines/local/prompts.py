"""Request → prompt and sampling for the embedded engine.

Owns: turning an OpenAI chat or completions body into prompt token ids (the chat template
for chat, strings or token ids for completions), the context-length check, and the
per-choice sampling parameters (`SamplingParams`: max tokens, temperature, top-p, seed,
stop strings, logprobs, penalties, logit_bias). Does not own the decode loop
(`engines.local.batcher`), response shapes (`engines.local.shapes`), structured output and
tools (`engines.local.structured`), nor any torch: pure Python over a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engines.base import InvalidRequest

__all__ = ["MAX_TOP_LOGPROBS", "Plan", "SamplingParams", "chat_prompt", "plan_request"]

MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """How one choice is generated; read by the decode thread."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # None: no logprobs; 0: the chosen token's only; k: plus the k most likely.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    # A token-level constraint (`engines.local.structured.Constraint`), one per choice.
    constraint: Any = None


@dataclass(slots=True)
class Plan:
    """A request's prompts and how each of its choices samples."""

    prompts: list[list[int]]
    n: int
    param: str  # the field a prompt problem is reported against
    echo: bool
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    logprobs: int | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    def params(self, index: int, prompt_len: int, context_len: int) -> SamplingParams:
        """Sampling for choice `index` (seeds differ per choice, as n > 1 needs)."""
        return SamplingParams(
            max_new_tokens=max(1, min(self.max_new, context_len - prompt_len)),
            temperature=self.temperature,
            top_p=self.top_p,
            seed=None if self.seed is None else self.seed + index,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
        )


def plan_request(
    tok: Any,
    body: dict[str, Any],
    *,
    chat: bool,
    context_len: int,
    vocab: int,
    max_tokens_default: int,
    messages: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Plan:
    """Validate and tokenise one request. `messages`/`tools` override the body's (the
    structured-output layer rewrites them); raises InvalidRequest naming the field."""
    param = "messages" if chat else "prompt"
    if chat:
        msgs = messages if messages is not None else body.get("messages") or []
        prompts = [chat_prompt(tok, msgs, tools)]
    else:
        prompts = _completion_prompts(tok, body, vocab)
    max_new = body.get("max_completion_tokens") or body.get("max_tokens")
    for ids in prompts:
        if len(ids) >= context_len:
            raise InvalidRequest(
                f"This model's maximum context length is {context_len} tokens. "
                f"However, your {param} has {len(ids)} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        # The client's own limit past the context is a 400, as OpenAI and vLLM answer,
        # not a silent clamp (the default limit is clamped to the room left).
        if max_new is not None and int(max_new) > context_len - len(ids):
            raise InvalidRequest(
                f"This model's maximum context length is {context_len} tokens. "
                f"However, you requested {len(ids) + int(max_new)} tokens ({len(ids)} in the "
                f"{param}, {int(max_new)} in the completion).",
                param="max_completion_tokens"
                if body.get("max_completion_tokens")
                else "max_tokens",
                code="context_length_exceeded",
            )
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    seed = body.get("seed")
    stop = body.get("stop") or []
    logprobs = _logprobs_k(chat, body)
    echo = bool(body.get("echo")) and not chat
    if echo and logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported by this engine", param="echo")
    return Plan(
        prompts=prompts,
        n=int(body.get("n") or 1),
        param=param,
        echo=echo,
        max_new=int(max_new) if max_new is not None else max_tokens_default,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=None if seed is None else int(seed),
        stop=[stop] if isinstance(stop, str) else [str(s) for s in stop],
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=logprobs,
        presence_penalty=float(body.get("presence_penalty") or 0.0),
        frequency_penalty=float(body.get("frequency_penalty") or 0.0),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab),
    )


def _logit_bias(raw: Any, vocab: int) -> dict[int, float] | None:
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest("logit_bias must map token ids to numbers", param="logit_bias")
    out: dict[int, float] = {}
    name = "logit_bias"
    for key, value in raw.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias key {key!r} is not a token id", param=name) from None
        if not 0 <= tid < vocab:
            raise InvalidRequest(f"logit_bias token id {tid} is out of range", param=name)
        if not isinstance(value, int | float) or not -100 <= value <= 100:
            raise InvalidRequest("logit_bias values must be between -100 and 100", param=name)
        out[tid] = float(value)
    return out


def chat_prompt(
    tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The chat template applied to `messages` (text content parts only)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise InvalidRequest(
                        f"content part type {part.get('type')!r} is not supported",
                        param=f"messages[{i}].content",
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        out.append({**m, "content": content if content is not None else ""})
    if not out:
        raise InvalidRequest("messages must not be empty", param="messages")
    kw: dict[str, Any] = {"tools": tools} if tools else {}
    text = tok.apply_chat_template(out, tokenize=False, add_generation_prompt=True, **kw)
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def _completion_prompts(tok: Any, body: dict[str, Any], vocab: int) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        raw: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt:
        raw = prompt
    else:
        raise InvalidRequest("prompt must be a non-empty string or list", param="prompt")
    out: list[list[int]] = []
    for item in raw:
        if isinstance(item, str):
            ids = tok(item)["input_ids"]
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            if any(not 0 <= t < vocab for t in item):
                raise InvalidRequest("prompt: token id out of range", param="prompt")
            ids = list(item)
        else:
            raise InvalidRequest("prompt: mixed or nested prompt types", param="prompt")
        if not ids:
            raise InvalidRequest("prompt: a prompt is empty", param="prompt")
        out.append(ids)
    return out


def _logprobs_k(chat: bool, body: dict[str, Any]) -> int | None:
    if chat:
        if not body.get("logprobs"):
            return None
        k = int(body.get("top_logprobs") or 0)
        name = "top_logprobs"
    else:
        raw = body.get("logprobs")
        if raw is None or raw is False:
            return None
        k = int(raw)
        name = "logprobs"
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}", param=name)
    return k
