"""Responses ↔ chat completions: what `/v1/responses` sends every engine, and what it answers.

Owns, in OpenAI's shapes (openai SDK 3.63, `openai/types/responses/`):
- `Turn`: one screened request — its id, its input items (each with an id, as
  `input_items` lists them), the context the model sees (the stored chain's items, then
  this input), and the chat body built from them;
- `build_turn`: input (a string or items: messages with text and image parts,
  `function_call` and `function_call_output`), `instructions`, function `tools` and
  `tool_choice`, `text.format` → `response_format`, sampling fields → a chat body, each
  refusal a 400 naming the Responses field (`input[2].call_id`, `tools[0].type`);
- `rename_param`: the chat field an engine or the chat screen named → the Responses field;
- `output_of` / `usage_of` / `response_object`: a chat completion → a Response object;
- the stored record (`record_bytes`, `history_of`).

Does not own storage (`gateway.responses.store`), the stream's events
(`gateway.responses.events`), or the route (`gateway.api.responses`).

Why one module of this size: the request → chat and chat → Response directions share the
item shapes and the parameter names in both directions (`rename_param` maps back what the
forward direction wrote); apart, each would carry a copy of that table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from random import getrandbits
from typing import Any

import orjson

from engines.errors import InvalidRequest
from gateway.responses.protocol import REFUSED, RESPONSES_FIELDS, ResponsesRequest

__all__ = [
    "Turn",
    "build_turn",
    "history_of",
    "new_id",
    "output_of",
    "record_bytes",
    "rename_param",
    "response_object",
    "usage_of",
]


def new_id(prefix: str) -> str:
    """OpenAI-style ids: `resp_…`, `msg_…`, `fc_…`, 48 hex digits from the process's
    `random` generator (seeded from the OS at start and again after a fork): unique, not a
    secret — an id is no handle on another key's record, whose owner is part of its
    address in the store. Why not `os.urandom`: one system call per id measured 34 µs here
    (three ids a request were most of the route's cost over chat, bench/responses_cost.py
    --in-process)."""
    return f"{prefix}_{getrandbits(192):048x}"


@dataclass(slots=True)
class Turn:
    """One screened Responses request."""

    req: ResponsesRequest
    id: str
    created_at: int
    # This request's input as items (ids given), and everything the model sees before
    # its answer: the stored chain's context and output, then these items.
    items: list[dict[str, Any]]
    context: list[dict[str, Any]]
    chat: dict[str, Any]
    # For each chat message, the Responses field it came from (errors name it).
    sources: list[str] = field(default_factory=list)
    # The Response fields that echo the request, built on first use (`response_object`).
    echo: dict[str, Any] | None = None

    @property
    def stream(self) -> bool:
        """Read by the engine request (`generate.engine_request`), as a chat request's."""
        return bool(self.req.stream)


# -- input items → normalised items -------------------------------------------------------

_TEXT_PARTS = {"input_text", "output_text", "text"}


def _text_part(kind: str, text: str) -> dict[str, Any]:
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": kind, "text": text}


def _norm_content(content: Any, role: str, where: str) -> list[dict[str, Any]]:
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return [_text_part(kind, content)]
    if not isinstance(content, list):
        raise InvalidRequest(
            f"Invalid value for '{where}': expected a string or a list of content parts.",
            param=where,
        )
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"Invalid value for '{at}': expected an object.", param=at)
        ptype = part.get("type")
        if ptype in _TEXT_PARTS or ptype == "refusal":
            text = part.get("refusal") if ptype == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"Missing required parameter: '{at}.text'.", param=f"{at}.text"
                )
            out.append(part if ptype == "refusal" else _text_part(kind, text))
        elif ptype == "input_image" and role != "assistant":
            if part.get("file_id"):
                raise InvalidRequest(
                    "Images by `file_id` are not supported: this gateway has no files API; "
                    "send `image_url` (an https or data URL).",
                    param=f"{at}.file_id",
                )
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise InvalidRequest(
                    f"Missing required parameter: '{at}.image_url'.", param=f"{at}.image_url"
                )
            detail = part.get("detail") or "auto"
            out.append({"type": "input_image", "image_url": url, "detail": detail})
        else:
            raise InvalidRequest(
                f"Invalid value for '{at}.type': content part type {ptype!r} is not "
                "supported here (input_text and input_image are; output_text and refusal "
                "in assistant messages).",
                param=f"{at}.type",
            )
    return out


def _norm_item(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, str):  # not in OpenAI's schema, but harmless: a user message
        item = {"role": "user", "content": item}
    if not isinstance(item, dict):
        raise InvalidRequest(f"Invalid value for '{where}': expected an object.", param=where)
    itype = item.get("type", "message" if "role" in item else None)
    if itype == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(
                f"Invalid value for '{where}.role': {role!r}; expected user, system, "
                "developer or assistant.",
                param=f"{where}.role",
            )
        prefix = "msg"
        out: dict[str, Any] = {
            "id": item.get("id") or new_id(prefix),
            "type": "message",
            "role": role,
            "content": _norm_content(item.get("content"), role, f"{where}.content"),
            "status": "completed",
        }
        return out
    if itype == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.{name}'.", param=f"{where}.{name}"
                )
        return {
            "id": item.get("id") or new_id("fc"),
            "type": "function_call",
            "call_id": item["call_id"],
            "name": item["name"],
            "arguments": item["arguments"],
            "status": "completed",
        }
    if itype == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str):
            raise InvalidRequest(
                f"Missing required parameter: '{where}.call_id'.", param=f"{where}.call_id"
            )
        if not isinstance(output, str | list):
            raise InvalidRequest(
                f"Missing required parameter: '{where}.output'.", param=f"{where}.output"
            )
        return {
            "id": item.get("id") or new_id("fco"),
            "type": "function_call_output",
            "call_id": item["call_id"],
            "output": output,
            "status": "completed",
        }
    raise InvalidRequest(
        f"Invalid value for '{where}.type': input item type {itype!r} is not supported "
        "(message, function_call and function_call_output are).",
        param=f"{where}.type",
    )


# -- items → chat messages -----------------------------------------------------------------


def _chat_content(parts: list[dict[str, Any]], where: str) -> str | list[dict[str, Any]]:
    if all(p["type"] != "input_image" for p in parts):
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in parts)
    out: list[dict[str, Any]] = []
    for p in parts:
        if p["type"] == "input_image":
            out.append(
                {"type": "image_url", "image_url": {"url": p["image_url"], "detail": p["detail"]}}
            )
        else:
            out.append({"type": "text", "text": p.get("text", "")})
    return out


def _output_text(output: Any) -> str:
    """A function_call_output's `output` as the tool message's text."""
    if isinstance(output, str):
        return output
    return "".join(str(p.get("text", "")) for p in output if isinstance(p, dict))


def _to_messages(
    items: list[dict[str, Any]], sources: list[str], first_input: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat messages of `items` (the stored context, then this input from `first_input`),
    and each message's source field. A `function_call_output` must answer a call made
    before it."""
    messages: list[dict[str, Any]] = []
    where: list[str] = []
    calls: set[str] = set()
    for k, item in enumerate(items):
        src = sources[k]
        itype = item["type"]
        if itype == "message":
            role = item["role"]
            messages.append(
                {
                    "role": role if role != "developer" else "system",
                    "content": _chat_content(item["content"], src),
                }
            )
            where.append(src)
        elif itype == "function_call":
            calls.add(item["call_id"])
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            # Parallel calls (and a call after the answer's text) are one assistant turn.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                where.append(src)
        else:  # function_call_output
            if item["call_id"] not in calls:
                raise InvalidRequest(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    param=f"{src}.call_id" if k >= first_input else "previous_response_id",
                )
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _output_text(item["output"]),
                }
            )
            where.append(src)
    return messages, where


# -- tools, tool_choice, text.format ------------------------------------------------------


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"Invalid value for 'tools[{i}].type': tool type {tool.get('type')!r} is not "
                "supported by this gateway (function tools are).",
                param=f"tools[{i}].type",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(
                f"Missing required parameter: 'tools[{i}].name'.", param=f"tools[{i}].name"
            )
        fn: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest(
                f"Invalid value for 'tool_choice': {choice!r}; expected auto, none, required "
                "or a function.",
                param="tool_choice",
            )
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequest(
            "Invalid value for 'tool_choice': only {'type': 'function', 'name': ...} is "
            "supported among the object forms.",
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None or not fmt.name:
        missing = "schema" if fmt.schema_ is None else "name"
        raise InvalidRequest(
            f"Missing required parameter: 'text.format.{missing}'.",
            param=f"text.format.{missing}",
        )
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


# -- the turn -------------------------------------------------------------------------------


def history_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored record's items for the next turn: its context, then its output."""
    return [*record["context"], *record["response"]["output"]]


def build_turn(
    req: ResponsesRequest,
    raw: dict[str, Any],
    history: list[dict[str, Any]],
) -> Turn:
    """The chat body of a Responses request after `history` (the stored chain, [] for a
    first turn). `raw` is the screened body (extension fields the model allows pass on)."""
    for name, defaults in REFUSED.items():
        if raw.get(name) not in defaults:
            raise InvalidRequest(
                f"The parameter `{name}` is not supported by this gateway.", param=name
            )
    text = req.input
    if isinstance(text, str) and not history:  # the common first turn, built directly
        items = [
            {"id": new_id("msg"), "type": "message", "role": "user",
             "content": [{"type": "input_text", "text": text}], "status": "completed"}
        ]  # fmt: skip
        context = items
        messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
        where = ["input"]
    else:
        if isinstance(text, str):
            items = [_norm_item({"role": "user", "content": text}, "input")]
            sources = ["input"]
        else:
            if not text and not history:
                raise InvalidRequest("'input' must not be empty.", param="input")
            items = [_norm_item(item, f"input[{i}]") for i, item in enumerate(text)]
            sources = [f"input[{i}]" for i in range(len(items))]
        context = [*history, *items]
        sources = ["previous_response_id"] * len(history) + sources
        messages, where = _to_messages(context, sources, len(history))
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
        where.insert(0, "instructions")
    if not messages:
        raise InvalidRequest("'input' must not be empty.", param="input")
    chat: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.stream:
        chat["stream"] = True
    if req.max_output_tokens is not None:
        chat["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        value = getattr(req, name)
        if value is not None:
            chat[name] = value
    if req.tools:
        chat["tools"] = _tools(req.tools)
    if req.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = _response_format(req)
    if fmt is not None:
        chat["response_format"] = fmt
    for name, value in raw.items():  # the model's allowed extensions (e.g. ignore_eos)
        if name not in RESPONSES_FIELDS:
            chat[name] = value
    return Turn(req, new_id("resp"), int(time.time()), items, context, chat, where)


def rename_param(turn: Turn, param: str | None) -> str | None:
    """The Responses field behind a chat field an error named."""
    if not param:
        return param
    head, _, rest = param.partition(".")
    base, bracket, _tail = head.partition("[")
    if base == "messages":
        if bracket:
            try:
                index = int(head[len("messages[") : -1])
            except ValueError:
                return "input"
            if 0 <= index < len(turn.sources):
                return turn.sources[index]
        return "input"
    if base == "response_format":
        return "text.format"
    if base in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if base == "tools" and rest.startswith("function"):
        rest = rest.removeprefix("function").lstrip(".")
        return f"{head}.{rest}" if rest else head
    return param


# -- chat completion → Response -------------------------------------------------------------


def usage_of(u: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat usage object → a Responses usage object (cached tokens where reported)."""
    if not isinstance(u, dict):
        return None
    prompt = int(u.get("prompt_tokens") or 0)
    completion = int(u.get("completion_tokens") or 0)
    pd = u.get("prompt_tokens_details") or {}
    cd = u.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": int(pd.get("cached_tokens") or 0),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(cd.get("reasoning_tokens") or 0)},
        "total_tokens": int(u.get("total_tokens") or prompt + completion),
    }


def message_item(text: str, status: str, mid: str | None = None) -> dict[str, Any]:
    return {
        "id": mid or new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [_text_part("output_text", text)] if status != "in_progress" else [],
    }


def call_item(
    call_id: str, name: str, arguments: str, status: str, fid: str | None = None
) -> dict[str, Any]:
    return {
        "id": fid or new_id("fc"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_of(chat: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The output items of a whole chat completion (its first choice), and its
    finish_reason."""
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    finish = choice.get("finish_reason")
    status = "incomplete" if finish == "length" else "completed"
    msg = choice.get("message") or {}
    content = msg.get("content")
    calls = msg.get("tool_calls") or []
    out: list[dict[str, Any]] = []
    if isinstance(content, str) and (content or not calls):
        out.append(message_item(content, status))
    elif not calls:
        out.append(message_item("", status))
    for call in calls:
        fn = call.get("function") or {}
        out.append(
            call_item(
                str(call.get("id") or new_id("call")),
                str(fn.get("name") or ""),
                str(fn.get("arguments") or ""),
                "completed",
            )
        )
    return out, finish


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict", True),
    }


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """The Response fields that echo the request (OpenAI's defaults where it sent none)."""
    choice = req.tool_choice
    if isinstance(choice, dict):
        choice = {"type": "function", "name": choice.get("name")}
    fmt: dict[str, Any] = {"type": "text"}
    if req.text is not None and req.text.format is not None:
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
    ptc = req.parallel_tool_calls
    return {
        "background": False,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None,
        "model": req.model,
        "parallel_tool_calls": ptc if ptc is not None else True,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": req.store is not False,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "text": {"format": fmt, "verbosity": "medium"},
        "tool_choice": choice if choice is not None else "auto",
        "tools": [_echo_tool(t) for t in req.tools or []],
        "top_logprobs": 0,
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "truncation": req.truncation or "disabled",
        "user": req.user,
        "metadata": req.metadata or {},
    }


def response_object(
    turn: Turn,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    finish: str | None = None,
) -> dict[str, Any]:
    """A Response object, every field the SDK's `Response` declares that applies here (the
    request's echo built once per turn: a stream's events carry it three times)."""
    echo = turn.echo
    if echo is None:
        echo = turn.echo = _echo(turn.req)
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": "max_output_tokens" if finish == "length" else "content_filter"}
    return {
        "id": turn.id,
        "object": "response",
        "created_at": turn.created_at,
        "status": status,
        "completed_at": int(time.time()) if status != "in_progress" else None,
        "error": error,
        "incomplete_details": incomplete,
        "output": output,
        "usage": usage,
        **echo,
    }


def record_bytes(turn: Turn, response: bytes) -> bytes:
    """The stored record of a finished turn: the Response (as sent) and the context it
    answered, joined as JSON without encoding the Response twice."""
    return b'{"response":' + response + b',"context":' + orjson.dumps(turn.context) + b"}"
