"""The embedded engine's OpenAI surface with no silent gaps, through the real `openai` SDK:
every embeddings input form, structured output enforced by constrained decoding, tools
answered as `tool_calls`, and fields the engine cannot honour refused with a 400 naming
them. Real SmolLM2-135M-Instruct and all-MiniLM-L6-v2 on CPU; generations stay short."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, EMBED_MODEL, ServerThread


@pytest.fixture
def client(embedded_gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{embedded_gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def _gauge(gw: ServerThread, name: str, model: str, route: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    m = re.search(rf'^{name}\{{model="{model}",route="{route}"\}} (\S+)$', text, re.M)
    assert m is not None, f"{name} for {model}/{route} not in /metrics"
    return float(m.group(1))


def _errors(gw: ServerThread, model: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    pattern = rf'^gateway_errors_total\{{model="{model}",route="embeddings",[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


# --------------------------------------------------------------------------- embeddings


def test_every_embeddings_input_form_gives_the_same_vectors(
    client: openai.OpenAI, embedded_gateway: ServerThread
) -> None:
    texts = ["The cat sits on the mat.", "Stock markets fell today."]
    tok = embedded_gateway.gateway.served.resolve(EMBED_MODEL).engine._embedder.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    one_str = client.embeddings.create(model=EMBED_MODEL, input=texts[0])
    strs = client.embeddings.create(model=EMBED_MODEL, input=texts)
    one_ids = client.embeddings.create(model=EMBED_MODEL, input=ids[0])
    many_ids = client.embeddings.create(model=EMBED_MODEL, input=ids)

    assert len(one_str.data) == len(one_ids.data) == 1
    assert len(strs.data) == len(many_ids.data) == 2
    assert [d.index for d in many_ids.data] == [0, 1]

    def close(a: list[float], b: list[float]) -> bool:
        return max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5

    # Token ids embed exactly like the text they spell ([CLS] … [SEP] added the same way).
    assert close(one_ids.data[0].embedding, one_str.data[0].embedding)
    assert close(many_ids.data[1].embedding, strs.data[1].embedding)
    assert close(strs.data[0].embedding, one_str.data[0].embedding)
    assert one_ids.usage.prompt_tokens == one_str.usage.prompt_tokens == len(ids[0]) + 2
    assert many_ids.usage.prompt_tokens == strs.usage.prompt_tokens


def test_embeddings_bounds_are_400s_and_settle_the_gauge(
    client: openai.OpenAI, embedded_gateway: ServerThread
) -> None:
    errors_before = _errors(embedded_gateway, EMBED_MODEL)
    refused = [
        [[101, 10**7]],  # a token id beyond the vocabulary
        [[]],  # an empty token list
        [[7592] * 600],  # longer than the model takes (max_model_len 256)
        ["x" * 10 + " word" * 400],  # the same as text
    ]
    for bad in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=EMBED_MODEL, input=bad)  # type: ignore[arg-type]
        assert e.value.body is not None and e.value.body.get("param") == "input"  # type: ignore[union-attr]
    # The engine-side failures (the first, third and fourth reached the engine) left no
    # request counted in flight, and each was counted as an error.
    assert _gauge(embedded_gateway, "gateway_requests_in_flight", EMBED_MODEL, "embeddings") == 0
    assert _errors(embedded_gateway, EMBED_MODEL) - errors_before == len(refused)
    ok = client.embeddings.create(model=EMBED_MODEL, input="still serving")
    assert len(ok.data[0].embedding) == 384


# --------------------------------------------------------------------------- structured output

CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "capital"],
    "additionalProperties": False,
}


def _validate(obj: object, schema: dict[str, object]) -> None:
    """The subset of JSON Schema used here, checked by hand (no validator dependency)."""
    assert isinstance(obj, dict)
    props = schema["properties"]
    assert isinstance(props, dict)
    assert set(obj) == set(props) == set(schema["required"])  # type: ignore[arg-type]
    for key, rule in props.items():
        value = obj[key]
        kind = rule["type"]
        assert isinstance(value, {"string": str, "boolean": bool, "integer": int}[kind])
        if "enum" in rule:
            assert value in rule["enum"]
        if "maxLength" in rule:
            assert len(value) <= rule["maxLength"]


def test_json_schema_answer_parses_and_validates(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=messages,  # type: ignore[arg-type]
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # ended by the grammar, not by max_tokens
    _validate(json.loads(choice.message.content or ""), CITY_SCHEMA)
    # Streamed, sampled with a seed: still valid.
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=messages,  # type: ignore[arg-type]
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=1.0,
        seed=3,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    _validate(json.loads(text), CITY_SCHEMA)
    # json_object: any JSON object.
    obj = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=messages,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a JSON object's beginning
        assert (obj.choices[0].message.content or "").startswith("{")


# --------------------------------------------------------------------------- tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def _check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "get_time" and set(args) == {"city"}
    assert isinstance(args["city"], str) and len(args["city"]) <= 24


def test_tool_choice_required_answers_tool_calls(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    _check_call(calls[0].function.name, calls[0].function.arguments)

    # Streamed: the SDK's stream helper assembles the same tool call from the deltas.
    with client.beta.chat.completions.stream(
        model=DEFAULT_MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    sc = final.choices[0]
    assert sc.finish_reason == "tool_calls"
    (scall,) = sc.message.tool_calls or []
    assert scall.function.name == calls[0].function.name
    assert json.loads(scall.function.arguments) == json.loads(calls[0].function.arguments)


def test_named_tool_choice_and_auto(client: openai.OpenAI) -> None:
    named = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
        temperature=0,
    )
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_time"
    _check_call(call.function.name, call.function.arguments)
    # auto: either plain text or a well-formed call, never a half-parsed mixture.
    auto = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        max_tokens=40,
        temperature=0,
    )
    msg = auto.choices[0].message
    if msg.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls" and msg.content is None
        _check_call(msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments)
    else:
        assert msg.content and not msg.content.startswith("<")


# --------------------------------------------------------------------------- refusals


def test_fields_the_engine_cannot_honour_are_400_with_param(client: openai.OpenAI) -> None:
    cases = [
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"extra_body": {"repetition_penalty": 1.3}}, "repetition_penalty"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=ASK,  # type: ignore[arg-type]
                max_tokens=4,
                **extra,  # type: ignore[arg-type]
            )
        body = e.value.body
        assert isinstance(body, dict) and body.get("param") == param, (param, body)
    with pytest.raises(openai.BadRequestError) as e2:
        client.completions.create(model=DEFAULT_MODEL, prompt="Hi", suffix="there", max_tokens=4)
    assert isinstance(e2.value.body, dict) and e2.value.body.get("param") == "suffix"
