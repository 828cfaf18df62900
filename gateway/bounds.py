"""Bounds on every list and map of a request body, checked before a worker sees it.

Owns the limits on messages (count, total characters, content parts, tool calls), tools
and functions (count, total size, schema depth), `response_format` schema depth,
`logit_bias` (entries, token ids, values in -100..100 as OpenAI), `metadata` (OpenAI's
16 pairs of 64 / 512 characters) and the nesting depth of operator-allowed extension
fields. Each limit is a `GATEWAY_*` setting (`gateway.settings`); each refusal is an
`InvalidRequest` whose `param` names the field. Runs on the raw JSON body, before the
pydantic models parse it, so a 100,000-entry map costs one `len()` and not a parse.
Media parts are judged by `gateway.media` from the message walk here.
"""

from __future__ import annotations

from typing import Any

import orjson

from engines.errors import InvalidRequest
from engines.spec import ModelSpec
from gateway.media import check_part
from gateway.settings import Settings


def _too_many(what: str, count: int, limit: int, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{what}' has {count} entries; at most {limit} allowed.", param=param, code="too_many"
    )


def too_deep(obj: Any, limit: int) -> bool:
    """Whether lists / objects nest more than `limit` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children: Any = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return False


def _depth(obj: Any, limit: int, param: str) -> None:
    if too_deep(obj, limit):
        raise InvalidRequest(
            f"'{param}' nests deeper than {limit} levels.", param=param, code="too_deep"
        )


def check_logit_bias(body: dict[str, Any], s: Settings) -> None:
    bias = body.get("logit_bias")
    if not isinstance(bias, dict):
        return  # absent, null, or the wrong type (the parser says so)
    if len(bias) > s.max_logit_bias:
        raise _too_many("logit_bias", len(bias), s.max_logit_bias, "logit_bias")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidRequest(
                "'logit_bias' keys must be token ids (non-negative integers).", param="logit_bias"
            )
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not -100 <= value <= 100
        ):
            raise InvalidRequest(
                "'logit_bias' values must be numbers from -100 to 100.", param="logit_bias"
            )


def check_metadata(body: dict[str, Any], s: Settings) -> None:
    meta = body.get("metadata")
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise InvalidRequest("'metadata' must be an object of strings.", param="metadata")
    if len(meta) > s.max_metadata_pairs:
        raise _too_many("metadata", len(meta), s.max_metadata_pairs, "metadata")
    for key, value in meta.items():
        if len(key) > s.max_metadata_key_chars:
            raise InvalidRequest(
                f"'metadata' keys are at most {s.max_metadata_key_chars} characters.",
                param="metadata",
            )
        if not isinstance(value, str) or len(value) > s.max_metadata_value_chars:
            raise InvalidRequest(
                f"'metadata' values are strings of at most {s.max_metadata_value_chars} "
                "characters.",
                param="metadata",
            )


def _check_tool_list(body: dict[str, Any], name: str, s: Settings) -> None:
    tools = body.get(name)
    if not isinstance(tools, list):
        return
    if len(tools) > s.max_tools:
        raise _too_many(name, len(tools), s.max_tools, name)
    size = len(orjson.dumps(tools))
    if size > s.max_tools_bytes:
        raise InvalidRequest(
            f"'{name}' is {size} bytes as JSON; at most {s.max_tools_bytes} allowed.",
            param=name,
            code="too_large",
        )
    for i, tool in enumerate(tools):
        fn = tool.get("function") if name == "tools" and isinstance(tool, dict) else tool
        params = fn.get("parameters") if isinstance(fn, dict) else None
        if params is not None:
            where = f"tools[{i}].function" if name == "tools" else f"functions[{i}]"
            _depth(params, s.max_schema_depth, f"{where}.parameters")


def check_tools(body: dict[str, Any], s: Settings) -> None:
    _check_tool_list(body, "tools", s)
    _check_tool_list(body, "functions", s)
    fmt = body.get("response_format")
    schema = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(schema, dict) and schema.get("schema") is not None:
        _depth(schema["schema"], s.max_schema_depth, "response_format.json_schema.schema")


def check_extensions(body: dict[str, Any], spec: ModelSpec, s: Settings) -> None:
    """Operator-allowed engine extensions (`guided_json`, ...): their nesting depth."""
    for name in spec.request_fields.allow_extra:
        value = body.get(name)
        if isinstance(value, dict | list):
            _depth(value, s.max_schema_depth, name)


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    return 0


def check_messages(
    body: dict[str, Any], spec: ModelSpec, s: Settings, hosts: dict[str, str]
) -> None:
    """Messages: count, total characters, content parts (each judged by the media
    policy; hosts to resolve go into `hosts`), tool calls per message."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > s.max_messages:
        raise _too_many("messages", len(messages), s.max_messages, "messages")
    chars = parts = 0
    policy, model = spec.media, spec.name
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            parts += len(content)
            if parts > s.max_content_parts:
                raise InvalidRequest(
                    f"The messages have more than {s.max_content_parts} content parts together.",
                    param=f"messages[{i}].content",
                    code="too_many",
                )
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    chars += _text_len(part.get("text"))
                check_part(part, f"messages[{i}].content[{j}]", policy, model, hosts)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            if len(calls) > s.max_tools:
                raise _too_many("tool_calls", len(calls), s.max_tools, f"messages[{i}].tool_calls")
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    chars += _text_len(fn.get("arguments"))
        if chars > s.max_message_chars:
            raise InvalidRequest(
                f"The messages have more than {s.max_message_chars} characters together.",
                param="messages",
                code="too_large",
            )


def check_chat(body: dict[str, Any], spec: ModelSpec, s: Settings, hosts: dict[str, str]) -> None:
    check_messages(body, spec, s, hosts)
    check_tools(body, s)
    check_logit_bias(body, s)
    check_metadata(body, s)
    if spec.request_fields.allow_extra:
        check_extensions(body, spec, s)


def check_completion(body: dict[str, Any], spec: ModelSpec, s: Settings) -> None:
    check_logit_bias(body, s)
    if spec.request_fields.allow_extra:
        check_extensions(body, spec, s)
