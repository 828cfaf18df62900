"""Structured output and tools for the embedded engine, enforced by constrained decoding.

Owns: reading `response_format` (`text`, `json_object`, `json_schema`), `tools` and
`tool_choice` (`none`, `auto`, `required`, a named function) off a chat body; putting the
tools into the prompt (through the chat template's own `tools` support when it has one,
otherwise as a system message in the Hermes `<tool_call>` convention); the grammar that
constrains decoding (llguidance: a JSON schema, or a Lark grammar whose tool-call branch
embeds the tools' parameter schemas); the per-sequence `Constraint` the decode loop masks
logits with; and parsing a finished call back into OpenAI `tool_calls`. Also the list of
request fields this engine cannot honour, refused with a 400 naming the field.
Does not own sampling, the decode loop or response shapes (`engines.local.batcher`,
`engines.local.shapes`).

Why llguidance (measured on this 2-core EPYC, SmolLM2's 49k vocabulary, a 3-field JSON
schema, 32 answer tokens): llguidance 1.9.1 compiles in ~4 ms and masks in 0.12–0.29 ms a
token, with no dependencies; lm-format-enforcer 0.11.3 does not import under transformers
5 (it imports `transformers.tokenization_utils.PreTrainedTokenizerBase`) and, shimmed,
masks in 2.3 ms a token; xgrammar 0.2.8 requires triton and apache-tvm-ffi on Linux x86_64
(a large install for a CPU engine), so it was not tried.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from engines.base import InvalidRequest

__all__ = [
    "Constraint",
    "Grammars",
    "Structured",
    "parse_call",
    "parse_structured",
    "refuse_unsupported",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

# Compact JSON: a small model left free to choose whitespace can emit it forever.
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Fields some OpenAI-compatible servers accept that this engine cannot honour: a non-default
# value is refused with a 400 naming the field rather than ignored.
_UNSUPPORTED: dict[str, Any] = {
    "suffix": None,
    "functions": None,
    "function_call": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "web_search_options": None,
    "top_k": None,
    "min_p": None,
    "repetition_penalty": None,
    "min_tokens": None,
    "use_beam_search": None,
    "prompt_logprobs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "structural_tag": None,
}
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "modalities": (None, ["text"]),
    "suffix": (None, ""),
}


def refuse_unsupported(body: dict[str, Any]) -> None:
    """400 for any field this engine would otherwise silently ignore."""
    for name in _UNSUPPORTED:
        if name in body and body[name] not in _DEFAULTS.get(name, (None,)):
            raise InvalidRequest(
                f"`{name}` is not supported by the embedded transformers engine", param=name
            )


@dataclass(slots=True)
class Structured:
    """What one chat request asks for beyond free text."""

    grammar: str | None = None  # llguidance grammar; None: free text
    tools: list[dict[str, Any]] | None = None  # OpenAI tool objects, when calls may happen
    tool_mode: str | None = None  # None, "auto" or "call" (required / named: a call is certain)
    messages: list[dict[str, Any]] | None = None  # rewritten messages (tools in the prompt)
    template_tools: list[dict[str, Any]] | None = None  # passed to the chat template


def parse_structured(body: dict[str, Any], *, chat: bool, template_has_tools: bool) -> Structured:
    """Validate response_format / tools / tool_choice; every problem names its field."""
    out = Structured()
    rf = body.get("response_format")
    schema: dict[str, Any] | None = None
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidRequest(
                "response_format.type must be text, json_object or json_schema",
                param="response_format.type",
            )
        if rf["type"] == "json_object":
            schema = {"type": "object"}
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise InvalidRequest(
                    "response_format.json_schema must be an object with a `schema` object",
                    param="response_format.json_schema",
                )
            schema = js.get("schema") or {"type": "object"}
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        if schema is not None:
            out.grammar = _json_grammar(schema, "response_format.json_schema.schema")
        return out
    if not chat:
        raise InvalidRequest("tools are only supported on /v1/chat/completions", param="tools")
    names = _check_tools(tools)
    if choice is None or choice == "auto":
        mode = "auto"
    elif choice == "none":
        mode = "none"
    elif choice == "required":
        mode = "required"
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in names:
            raise InvalidRequest(
                f"tool_choice names function {name!r}, which is not in tools",
                param="tool_choice.function.name",
            )
        mode = "named"
        tools = [t for t in tools if t["function"]["name"] == name]
    else:
        raise InvalidRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", ...}',
            param="tool_choice",
        )
    if mode == "none":
        if schema is not None:
            out.grammar = _json_grammar(schema, "response_format.json_schema.schema")
        return out
    if schema is not None:
        raise InvalidRequest(
            "response_format together with tools is not supported by this engine "
            '(use tool_choice "none", or drop one of them)',
            param="response_format",
        )
    call = _call_schema(tools)
    body_rule = "%json " + json.dumps(call)
    if mode == "auto":
        # Free text may not begin with "<": that first byte is the tool-call branch's.
        lark = (
            f"start: call | free\ncall: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}\n"
            f"body: {body_rule}\nfree: /[^<](.|\\n)*/\n"
        )
    else:
        lark = f"start: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}\nbody: {body_rule}\n"
    out.grammar = _compile_check(_lark_grammar(lark), "tools")
    out.tools = tools
    out.tool_mode = "auto" if mode == "auto" else "call"
    messages = [_render_history(m) for m in body.get("messages") or []]
    if template_has_tools:
        out.template_tools = tools
    else:
        messages = [{"role": "system", "content": _tools_prompt(tools, out.tool_mode)}, *messages]
    out.messages = messages
    return out


def _check_tools(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    names: list[str] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise InvalidRequest(
                "only tools of type function are supported", param=f"tools[{i}].type"
            )
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest("a function needs a name", param=f"tools[{i}].function.name")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise InvalidRequest(
                "parameters must be a JSON schema object", param=f"tools[{i}].function.parameters"
            )
        where = f"tools[{i}].function.parameters"
        _compile_check(_schema_grammar(params or {"type": "object"}, where), where)
        names.append(fn["name"])
    return names


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    variants = []
    for t in tools:
        fn = t["function"]
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": fn.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _tools_prompt(tools: list[dict[str, Any]], mode: str) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    how = (
        "Call one of them now."
        if mode == "call"
        else "Call one only if it helps; otherwise answer in plain text."
    )
    return (
        "You are a helpful assistant that can call functions. The functions:\n"
        f"<tools>\n{listed}\n</tools>\n"
        f"{how} To call a function, answer with {CALL_OPEN}"
        '{"name": <function name>, "arguments": <arguments as a JSON object>}'
        f"{CALL_CLOSE}"
    )


def _render_history(m: dict[str, Any]) -> dict[str, Any]:
    """Earlier assistant tool calls and tool results as text the model can read."""
    calls = m.get("tool_calls")
    if m.get("role") == "assistant" and calls:
        text = str(m.get("content") or "")
        for c in calls:
            fn = c.get("function") or {}
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                args = fn.get("arguments")
            text += CALL_OPEN + json.dumps({"name": fn.get("name"), "arguments": args}) + CALL_CLOSE
        return {"role": "assistant", "content": text}
    return m


def parse_call(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The OpenAI `tool_calls` list for a generated `<tool_call>{…}</tool_call>`, or None
    when the text is not a complete call (plain text, or cut by max_tokens)."""
    s = text.strip()
    if not s.startswith(CALL_OPEN):
        return None
    inner = s[len(CALL_OPEN) :]
    if inner.endswith(CALL_CLOSE):
        inner = inner[: -len(CALL_CLOSE)]
    try:
        obj = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    return [
        {
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
        }
    ]


# --------------------------------------------------------------------------- grammars


def _schema_grammar(schema: dict[str, Any], param: str) -> str:
    import llguidance

    try:
        grammar: str = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides=_JSON_OPTIONS
        )
    except ValueError as e:
        raise InvalidRequest(f"invalid JSON schema: {e}", param=param) from e
    return grammar


def _lark_grammar(lark: str) -> str:
    import llguidance

    grammar: str = llguidance.LLMatcher.grammar_from_lark(lark)
    return grammar


def _json_grammar(schema: dict[str, Any], param: str) -> str:
    return _compile_check(_schema_grammar(schema, param), param)


def _compile_check(grammar: str, param: str) -> str:
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        raise InvalidRequest(f"cannot enforce this schema: {err}", param=param)
    return grammar


class Grammars:
    """The tokenizer side of llguidance for one model (built once: ~1 s for 49k tokens)."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance.hf

        self.vocab = vocab
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self, grammar)


class Constraint:
    """One sequence's grammar state: the allowed-token mask before each step, and the
    token that was chosen after it. Used only on the decode thread."""

    __slots__ = ("_m", "_vocab")

    def __init__(self, grammars: Grammars, grammar: str) -> None:
        import llguidance

        self._m = llguidance.LLMatcher(grammars.lltok, grammar)
        self._vocab = grammars.vocab
        if self._m.is_error():
            raise InvalidRequest(f"cannot enforce this grammar: {self._m.get_error()}")

    def allowed(self) -> Any:
        """A bool tensor [vocab]: the tokens the grammar allows next (EOS once complete)."""
        import numpy as np
        import torch

        raw = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[: self._vocab].astype(np.bool_)
        return torch.from_numpy(bits)

    def advance(self, token: int) -> None:
        self._m.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and takes nothing more (the sequence ends with "stop")."""
        return bool(self._m.is_stopped())
