"""Which fields of a request body reach a worker: OpenAI's, plus what the operator allows.

Owns the per-route sets of OpenAI request fields (copied from the official `openai`
SDK's request types; tests/test_hostile_fields.py fails when the SDK grows a field this
list lacks), the message and content-part field sets, and `screen_fields`, which refuses
(400 naming the field) or drops, as the model's `request_fields.unknown` says, every
other key. It strips a client-sent `cache_salt` and applies the gateway's own
(`cache_salt_for`). It does not check values (`gateway.protocol`, `gateway.bounds`) nor
media URLs (`gateway.media`).

An allowlist and not a deny-list: engines keep adding body extensions (templates,
tensors, connector parameters), and a field nobody reviewed must not reach a worker.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from engines.errors import InvalidRequest
from engines.spec import RequestFieldsSpec

if TYPE_CHECKING:
    from engines.base import Engine

Route = Literal["chat", "completions", "embeddings", "responses"]

# openai 3.57: openai/types/chat/completion_create_params.py (CompletionCreateParamsBase
# and its streaming / non-streaming subclasses' `stream`).
CHAT_FIELDS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
# openai/types/completion_create_params.py
COMPLETION_FIELDS = frozenset(
    {
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "model",
        "n",
        "presence_penalty",
        "prompt",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "top_p",
        "user",
    }
)
# openai/types/embedding_create_params.py
EMBEDDING_FIELDS = frozenset({"dimensions", "encoding_format", "input", "model", "user"})
# openai 3.63: ResponseCreateParamsBase and its subclasses' `stream`.
RESPONSES_FIELDS = frozenset(
    {
        "access_programs",
        "background",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "include",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "model",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)
ROUTE_FIELDS: dict[Route, frozenset[str]] = {
    "chat": CHAT_FIELDS,
    "completions": COMPLETION_FIELDS,
    "embeddings": EMBEDDING_FIELDS,
    "responses": RESPONSES_FIELDS,
}
# The union of openai/types/chat/chat_completion_*_message_param.py.
MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"}
)
# openai/types/chat/chat_completion_stream_options_param.py, plus vLLM's per-chunk usage.
STREAM_OPTION_FIELDS = frozenset({"include_usage", "include_obfuscation", "continuous_usage_stats"})

CACHE_SALT = "cache_salt"


@lru_cache(maxsize=256)
def _allowed(route: Route, extra: tuple[str, ...]) -> frozenset[str]:
    return ROUTE_FIELDS[route].union(extra)


# Per rules object (frozen, one per model) and route: its allowed set, computed once.
_BY_RULES: dict[tuple[int, Route], tuple[RequestFieldsSpec, frozenset[str]]] = {}


def allowed_fields(route: Route, rules: RequestFieldsSpec) -> frozenset[str]:
    """The route's OpenAI fields plus the model's `allow_extra`."""
    hit = _BY_RULES.get((id(rules), route))
    if hit is not None and hit[0] is rules:
        return hit[1]
    allowed = _allowed(route, tuple(rules.allow_extra))
    _BY_RULES[(id(rules), route)] = (rules, allowed)  # holds `rules`: its id stays its own
    return allowed


def _refuse_or_drop(obj: dict[str, Any], names: list[str], where: str, policy: str) -> None:
    if policy == "drop":
        for name in names:
            del obj[name]
        return
    name = sorted(names)[0]
    param = f"{where}.{name}" if where else name
    raise InvalidRequest(
        f"The field `{name}` is not accepted by this gateway.",
        param=param,
        code="unsupported_field",
    )


def screen_fields(body: dict[str, Any], route: Route, rules: RequestFieldsSpec) -> None:
    """Leave in `body` only the fields that may reach a worker (in place); 400 on the
    first other one unless the model's policy is `drop`. Messages and stream options
    are screened against OpenAI's own fields only."""
    # issuperset: no set built on the common path (measured: this check is per request).
    body.pop(CACHE_SALT, None)  # the gateway's to set (cache_salt_for), never the client's
    allowed = allowed_fields(route, rules)
    if not allowed.issuperset(body):
        _refuse_or_drop(body, list(body.keys() - allowed), "", rules.unknown)
    opts = body.get("stream_options")
    if isinstance(opts, dict) and not STREAM_OPTION_FIELDS.issuperset(opts):
        _refuse_or_drop(
            opts, list(opts.keys() - STREAM_OPTION_FIELDS), "stream_options", rules.unknown
        )
    if route == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            fields = MESSAGE_FIELDS
            for i, msg in enumerate(messages):
                if isinstance(msg, dict) and not fields.issuperset(msg):
                    odd = list(msg.keys() - fields)
                    _refuse_or_drop(msg, odd, f"messages[{i}]", rules.unknown)


def cache_salt_for(engine: Engine, tenant: str | None) -> str | None:
    """The prefix-cache domain of a request, set by the gateway and never by a client.

    `tenant` is the calling API key's own random salt (`gateway.keys.KeyRecord.cache_salt`),
    so every request of a key shares a prefix cache only with that key's. Without hashed
    keys (no tenant) no salt is set and the worker's default (one shared domain per model)
    applies; nor for an engine whose workers do not take one (`Engine.takes_cache_salt`)."""
    if tenant is None or not engine.takes_cache_salt:
        return None
    return tenant


def apply_cache_salt(body: dict[str, Any], engine: Engine, tenant: str | None) -> None:
    salt = cache_salt_for(engine, tenant)
    if salt is not None:
        body[CACHE_SALT] = salt
