"""The OpenAPI document of every route, built from the pydantic models the gateway
validates with (`gateway.protocol`) plus documentation-only models of the responses.

Owns the document only: dispatch stays raw (the hot routes never pass FastAPI's router,
`gateway.app.FrontDoor`), so the routes are described here rather than discovered, and
`tests/test_openapi_cors.py` checks the two lists agree. Built once per app, on the
first request for `/openapi.json`; nothing here runs per request.

Why one module of this size: the route list and each route's request and response schemas
are one table that the agreement test reads whole; split by route family, the table would
be assembled again somewhere else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gateway.keys import KeyPolicy
from gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.responses.protocol import ResponsesRequest

REF = "#/components/schemas/{model}"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Doc):
    """OpenAI's error envelope; every 4xx/5xx answer has this body."""

    error: ErrorDetail


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class AssistantMessage(_Doc):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChunkDelta(_Doc):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Doc):
    """One `data:` event of a streamed chat completion; the stream ends `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Doc):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class Completion(_Doc):
    """A completion, or (streamed, `data:` events) one chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(_Doc):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 when asked")


class EmbeddingList(_Doc):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(_Doc):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = Field(default=None, description="the base model of an adapter")
    max_model_len: int | None = None


class ModelList(_Doc):
    object: Literal["list"] = "list"
    data: list[Model]


class LoadLoraAdapterRequest(_Doc):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="under one of the model's lora roots")
    base_model: str | None = Field(
        default=None, description="needed when several models take adapters"
    )


class UnloadLoraAdapterRequest(_Doc):
    lora_name: str = Field(min_length=1)


class ModelHealth(_Doc):
    ready: bool
    state: str
    workers: dict[str, Any] = Field(
        description="healthy and total counts; the list with URLs only with the admin key"
    )
    detail: str | None = Field(default=None, description="only with the admin key")


class Health(_Doc):
    status: Literal["ok", "degraded"]
    models: dict[str, ModelHealth]


class Probe(_Doc):
    status: str


class ApiKey(_Doc):
    """An API key's record as the admin API shows it (no hash, salt or cache salt)."""

    id: str
    name: str = ""
    created: float
    revoked: bool = False
    expires_at: float | None = None
    models: list[str] | None = None
    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0
    budget_tokens: int = 0


class NewApiKey(ApiKey):
    key: str = Field(description="the plaintext key: in this answer only")


class ApiKeyList(_Doc):
    object: Literal["list"] = "list"
    data: list[ApiKey]


class ApiKeyUsage(_Doc):
    id: str
    days: dict[str, dict[str, dict[str, int]]] = Field(
        description="day → model → prompt_tokens, completion_tokens, requests_<outcome>"
    )
    in_flight: int
    reserved_tokens: int


class ResponseUsage(_Doc):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(description="cached_tokens, cache_write_tokens")
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(description="reasoning_tokens")
    total_tokens: int


class ResponseObject(_Doc):
    """A Response (`/v1/responses`); streamed, `event:`/`data:` pairs of its events
    (response.created … response.completed, each with a `sequence_number`)."""

    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    model: str
    output: list[dict[str, Any]] = Field(
        description="`message` items (output_text parts) and `function_call` items"
    )
    previous_response_id: str | None = None
    instructions: str | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class ResponseDeleted(_Doc):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool


class ResponseItemList(_Doc):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(description="input items: messages, function calls…")
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class TokenizeRequest(_Doc):
    """vLLM's: a `prompt` or chat `messages` (then the model's chat template applies)."""

    model: str | None = Field(default=None, description="optional with one generate model")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Doc):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Doc):
    prompt: str


class Status(_Doc):
    """What the status page (/ui) shows: per model its state, queue, adapters and workers;
    request counts and cumulative latency histograms."""

    models: list[dict[str, Any]]
    traffic: dict[str, Any]


class StatusSeries(_Doc):
    """The status page's charts (`gateway.series`): the last 15 minutes in `bucket_s`
    buckets from `start` (Unix seconds), every front door's added up (`fronts`); per model
    and for `all`, columns of one value per bucket: requests (a count), requests_s,
    errors_s, rate_limited_s, prompt_tokens_s, completion_tokens_s, e2e_p50/p95/p99 and
    ttft_p50/p95/p99 (seconds, null without requests), in_flight, queued, waiting."""

    bucket_s: int
    now: float
    start: float
    fronts: int
    all: dict[str, list[float | None]]
    models: dict[str, dict[str, list[float | None]]]


MODELS: list[type[BaseModel]] = [
    KeyPolicy,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    ResponseObject,
    ResponseDeleted,
    ResponseItemList,
    TokenizeRequest,
    TokenizeResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    ErrorResponse,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    EmbeddingList,
    Model,
    ModelList,
    Health,
    Probe,
    Status,
    StatusSeries,
    ApiKey,
    NewApiKey,
    ApiKeyList,
    ApiKeyUsage,
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


# Every operation may answer these, all in OpenAI's error envelope (the server's own limits
# — 408, 429, 431, 503 — apply to every route).
_ERRORS = {
    "400": _json(ErrorResponse, "invalid request"),
    "401": _json(ErrorResponse, "missing or wrong API key"),
    "403": _json(ErrorResponse, "not allowed (e.g. the admin API is disabled)"),
    "404": _json(ErrorResponse, "unknown model, adapter or key"),
    "405": _json(ErrorResponse, "method not allowed on this path"),
    "408": _json(ErrorResponse, "the request's headers or body arrived too slowly"),
    "413": _json(ErrorResponse, "body too large"),
    "429": _json(ErrorResponse, "rate limited or overloaded; see Retry-After"),
    "431": _json(ErrorResponse, "request headers too large"),
    "500": _json(ErrorResponse, "engine failure"),
    "502": _json(ErrorResponse, "a worker failed"),
    "503": _json(ErrorResponse, "no worker available, draining, or too many connections"),
    "504": _json(ErrorResponse, "engine timeout"),
}
_ID_HEADER = {
    "name": "x-request-id",
    "in": "header",
    "required": False,
    "description": "your request id (printable ASCII, at most 128 characters); kept, "
    "logged, forwarded to the worker and echoed back",
    "schema": {"type": "string", "maxLength": 128},
}


def _generate(
    summary: str, body: type[BaseModel], whole: type[BaseModel], chunk: type[BaseModel]
) -> dict[str, Any]:
    ok = _json(whole, "the response; with `stream: true`, server-sent events")
    ok["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": f"`data: <{chunk.__name__}>` events"}
    }
    return {
        "post": {
            "summary": summary,
            "tags": ["OpenAI API"],
            "security": [{"bearer": []}],
            "parameters": [_ID_HEADER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body)}},
            },
            "responses": {"200": ok, **_ERRORS},
        }
    }


def _simple(
    method: str, summary: str, tag: str, ok: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        method: {"summary": summary, "tags": [tag], "responses": {"200": ok, **_ERRORS}, **extra}
    }


# The admin routes' `{key_id}`: the id part of `gk-<id>.<secret>`.
_KEY_ID = {
    "name": "key_id",
    "in": "path",
    "required": True,
    "description": "the key's id (`id` in the admin API's answers)",
    "schema": {"type": "string"},
}


_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "description": "a response id (`resp_…`) this key created",
    "schema": {"type": "string"},
}
_PAGE = [
    {"name": "order", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
]  # fmt: skip


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def build_openapi(title: str, version: str) -> dict[str, Any]:
    """The whole document (OpenAPI 3.1)."""
    _, schemas = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    keyed: dict[str, Any] = {"security": [{"bearer": []}]}
    admin: dict[str, Any] = {
        "security": [{"bearer": []}],
        "description": "Needs GATEWAY_ADMIN_KEY as the bearer token.",
    }
    paths: dict[str, Any] = {
        "/v1/chat/completions": _generate(
            "Create a chat completion", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk
        ),
        "/v1/completions": _generate(
            "Create a completion", CompletionRequest, Completion, Completion
        ),
        "/v1/embeddings": {
            "post": {
                "summary": "Create embeddings",
                "tags": ["OpenAI API"],
                "security": [{"bearer": []}],
                "parameters": [_ID_HEADER],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(EmbeddingRequest)}},
                },
                "responses": {"200": _json(EmbeddingList, "the embeddings"), **_ERRORS},
            }
        },
        "/v1/responses": _generate(
            "Create a response (chat completions underneath; stored per key unless "
            "`store: false`)", ResponsesRequest, ResponseObject, ResponseObject,
        ),
        "/v1/responses/{response_id}": {
            **_simple("get", "A stored response of this key", "OpenAI API",
                      _json(ResponseObject, "the response"), parameters=[_RESPONSE_ID],
                      **keyed),
            **_simple("delete", "Delete a stored response of this key", "OpenAI API",
                      _json(ResponseDeleted, "deleted"), parameters=[_RESPONSE_ID], **keyed),
        },
        "/v1/responses/{response_id}/input_items": _simple(
            "get", "The items a stored response answered (its chain's, then its input)",
            "OpenAI API", _json(ResponseItemList, "a page of items"),
            parameters=[_RESPONSE_ID, *_PAGE], **keyed,
        ),
        "/tokenize": _simple(
            "post", "Tokenize a prompt or chat messages with the model's tokenizer (vLLM's)",
            "OpenAI API", _json(TokenizeResponse, "the tokens"),
            requestBody={"required": True, "content": {"application/json": {
                "schema": _ref(TokenizeRequest)}}},
            **keyed,
        ),
        "/detokenize": _simple(
            "post", "Token ids back to text (vLLM's)", "OpenAI API",
            _json(DetokenizeResponse, "the text"),
            requestBody={"required": True, "content": {"application/json": {
                "schema": _ref(DetokenizeRequest)}}},
            **keyed,
        ),
        "/v1/models": _simple(
            "get", "List the served models and adapters", "OpenAI API",
            _json(ModelList, "base models, then adapters"), **keyed,
        ),
        "/v1/models/{model_id}": _simple(
            "get", "One served model or adapter", "OpenAI API", _json(Model, "the model"),
            parameters=[{"name": "model_id", "in": "path", "required": True,
                         "schema": {"type": "string"}}],
            **keyed,
        ),
        "/v1/load_lora_adapter": _simple(
            "post", "Load a LoRA adapter on every worker of its base model", "Admin",
            _text("Success: ..."),
            requestBody={"required": True, "content": {"application/json": {
                "schema": _ref(LoadLoraAdapterRequest)}}},
            **admin,
        ),
        "/v1/unload_lora_adapter": _simple(
            "post", "Unload a LoRA adapter", "Admin", _text("Success: ..."),
            requestBody={"required": True, "content": {"application/json": {
                "schema": _ref(UnloadLoraAdapterRequest)}}},
            **admin,
        ),
        "/admin/keys": {
            "post": {
                "summary": "Create an API key (the plaintext is in this answer only)",
                "tags": ["Admin"],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref(KeyPolicy)}}},
                "responses": {"201": _json(NewApiKey, "the key and its record"), **_ERRORS},
                **admin,
            },
            **_simple("get", "List API keys (no secrets)", "Admin",
                      _json(ApiKeyList, "every key's record"), **admin),
        },
        "/admin/keys/{key_id}": {
            **_simple("get", "One API key's record", "Admin", _json(ApiKey, "the record"),
                      parameters=[_KEY_ID], **admin),
            **_simple("delete", "Revoke an API key", "Admin",
                      _json(ApiKey, "the record, revoked"), parameters=[_KEY_ID], **admin),
        },
        "/admin/keys/{key_id}/usage": _simple(
            "get", "An API key's usage by day and model, and what is in flight", "Admin",
            _json(ApiKeyUsage, "the ledger"), parameters=[_KEY_ID], **admin,
        ),
        "/health": _simple(
            "get", "Every model's readiness and workers (503 unless all are ready)",
            "Operations", _json(Health, "all models ready"),
        ),
        "/health/live": _simple(
            "get", "Liveness: the process answers", "Operations", _json(Probe, "alive")
        ),
        "/health/ready": _simple(
            "get", "Readiness: 200 when any model is ready, else 503", "Operations",
            _json(Probe, "ready"),
        ),
        "/metrics": _simple(
            "get", "Prometheus metrics", "Operations", _text("exposition format")
        ),
        "/status": _simple(
            "get", "Models, workers, adapters and traffic for the status page", "Operations",
            _json(Status, "the status"), **keyed,
        ),
        "/status/series": _simple(
            "get", "The status page's charts: the last 15 minutes per model", "Operations",
            _json(StatusSeries, "the series"), **keyed,
        ),
        "/ui": _simple(
            "get", "Status page and chat playground", "Operations",
            _text("the page", "text/html"),
        ),
    }  # fmt: skip
    for op in ("/health", "/health/ready"):
        paths[op]["get"]["responses"]["503"] = _json(
            Health if op == "/health" else Probe, "not ready"
        )
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
