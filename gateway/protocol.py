"""The OpenAI wire format of requests, and the order of the checks every request meets.

Owns: pydantic models mirroring OpenAI's request bodies (field names exactly as OpenAI's),
the scalar bounds (n, max_tokens, stop, prompts), and `validate_*`, which run, in order:
the field allowlist (`gateway.allowlist`: only OpenAI's fields and the model's allowed
extensions stay in the body), the list / map bounds and media policy (`gateway.bounds`,
`gateway.media`), then the typed parse — all before anything reaches an engine, each
failing with an `InvalidRequest` whose `param` names the field. Response bodies are
produced by the engines in OpenAI's shapes. No engine imports beyond the error tree and
the spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.errors import InvalidRequest
from engines.spec import ModelSpec
from gateway import bounds
from gateway.allowlist import screen_fields
from gateway.settings import Settings

M = TypeVar("M", bound=BaseModel)


class _Loose(BaseModel):
    """OpenAI bodies: known fields typed; other keys left after the allowlist (the
    model's allowed extensions) are kept for the engine."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(_Loose):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


Stop = str | list[str] | None
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Loose):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: Stop = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class EmbeddingRequest(_Loose):
    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        elif part in {"str", "list[str]", "list[int]", "list[list[int]]", "list[dict[str,any]]"}:
            continue  # a union member's name, not a field
        else:
            out += f".{part}"
    return out


def _parse(cls: type[M], body: dict[str, Any]) -> M:
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            msg = f"Missing required parameter: '{param}'."
        else:
            msg = f"Invalid value for '{param}': {err['msg']}."
        raise InvalidRequest(msg, param=param, code="invalid_value") from None


def _check_stop(stop: Stop, settings: Settings) -> None:
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequest(
            f"'stop' has {len(stops)} sequences; at most {settings.max_stop_sequences} allowed.",
            param="stop",
        )
    for s in stops:
        if not s:
            raise InvalidRequest("'stop' sequences must not be empty.", param="stop")
        if len(s) > settings.max_stop_length:
            raise InvalidRequest(
                f"A 'stop' sequence is {len(s)} characters; at most "
                f"{settings.max_stop_length} allowed.",
                param="stop",
            )


def _check_common(req: _Sampling, max_model_len: int, settings: Settings) -> None:
    if req.n > settings.max_n:
        raise InvalidRequest(f"'n' is {req.n}; at most {settings.max_n} allowed.", param="n")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    if req.max_tokens is not None and req.max_tokens > max_model_len:
        raise InvalidRequest(
            f"'max_tokens' is {req.max_tokens}, more than the model's context length of "
            f"{max_model_len} tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    _check_stop(req.stop, settings)


def validate_chat(
    body: dict[str, Any], spec: ModelSpec, settings: Settings, hosts: dict[str, str]
) -> ChatCompletionRequest:
    """Screen (in place), bound and parse a chat body. Media host names still to resolve
    (`gateway.media.check_hosts`) go into `hosts` (host → the param of its URL)."""
    screen_fields(body, "chat", spec.request_fields)
    bounds.check_chat(body, spec, settings, hosts)
    req = _parse(ChatCompletionRequest, body)
    max_model_len = spec.max_model_len
    _check_common(req, max_model_len, settings)
    if req.max_completion_tokens is not None and req.max_completion_tokens > max_model_len:
        raise InvalidRequest(
            f"'max_completion_tokens' is {req.max_completion_tokens}, more than the model's "
            f"context length of {max_model_len} tokens.",
            param="max_completion_tokens",
            code="context_length_exceeded",
        )
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
    return req


def _prompt_count(prompt: Prompt) -> int:
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def validate_completion(
    body: dict[str, Any], spec: ModelSpec, settings: Settings
) -> CompletionRequest:
    """Screen (in place), bound and parse a completions body."""
    screen_fields(body, "completions", spec.request_fields)
    bounds.check_completion(body, spec, settings)
    req = _parse(CompletionRequest, body)
    _check_common(req, spec.max_model_len, settings)
    if isinstance(req.prompt, list) and not req.prompt:
        raise InvalidRequest("'prompt' must not be empty.", param="prompt")
    count = _prompt_count(req.prompt)
    if count > settings.max_prompts:
        raise InvalidRequest(
            f"'prompt' has {count} prompts; at most {settings.max_prompts} allowed.", param="prompt"
        )
    if count * req.n > settings.max_sequences_per_request:
        raise InvalidRequest(
            f"{count} prompts × n={req.n} is {count * req.n} sequences; at most "
            f"{settings.max_sequences_per_request} per request.",
            param="n",
        )
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("'best_of' other than 'n' is not supported.", param="best_of")
    return req


def validate_embedding(
    body: dict[str, Any], spec: ModelSpec, settings: Settings
) -> EmbeddingRequest:
    """Screen (in place), bound and parse an embeddings body."""
    screen_fields(body, "embeddings", spec.request_fields)
    req = _parse(EmbeddingRequest, body)
    inp = req.input
    if isinstance(inp, str):
        if not inp:
            raise InvalidRequest("'input' must not be empty.", param="input")
        return req
    if not inp:
        raise InvalidRequest("'input' must not be empty.", param="input")
    if len(inp) > settings.max_embedding_inputs and not isinstance(inp[0], int):
        raise InvalidRequest(
            f"'input' has {len(inp)} items; at most {settings.max_embedding_inputs} allowed.",
            param="input",
        )
    if any(isinstance(x, str | list) and not x for x in inp):
        raise InvalidRequest("'input' must not contain empty items.", param="input")
    return req


def embedding_inputs(req: EmbeddingRequest) -> list[str] | list[list[int]]:
    """The inputs as a list of strings or a list of token-id lists."""
    inp = req.input
    if isinstance(inp, str):
        return [inp]
    if inp and isinstance(inp[0], int):
        return [inp]
    return cast("list[str] | list[list[int]]", inp)
