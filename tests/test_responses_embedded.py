"""`/v1/responses` and `/tokenize` end to end on the real embedded model (SmolLM2 on CPU),
with the official `openai` SDK: a plain answer, a required function call with JSON
arguments (whole and streamed, its argument deltas equal to the final arguments), the tool
result sent back on a stored chain, `text.format` json_schema enforced by the engine, an
image part the engine cannot read refused naming the input item, and /tokenize counting
what a request is billed. Generations are kept short."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, ServerThread

WEATHER = {
    "type": "function",
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
    "strict": True,
}
ASK = "What is the weather like in Paris right now?"


@pytest.fixture
def client(embedded_gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{embedded_gateway.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_plain_answer(client: openai.OpenAI) -> None:
    resp = client.responses.create(
        model=DEFAULT_MODEL, input="What is the capital of France?", max_output_tokens=12
    )
    assert resp.status in ("completed", "incomplete")
    assert "Paris" in resp.output_text
    assert resp.usage is not None and resp.usage.input_tokens > 5
    assert resp.usage.output_tokens <= 12


def test_required_function_call_then_its_result_on_the_chain(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=DEFAULT_MODEL,
        input=ASK,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=60,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and first.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id and call.id.startswith("fc_")
    args = json.loads(call.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")

    second = client.responses.create(
        model=DEFAULT_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=16,
    )
    assert second.output[0].type == "message" and second.output_text
    assert second.previous_response_id == first.id
    kinds = [i.type for i in client.responses.input_items.list(second.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output"]


def test_streamed_function_call_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=DEFAULT_MODEL,
            input=ASK,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2].item.type == "function_call"  # type: ignore[union-attr]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert events[-3].arguments == deltas  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    (call,) = final.output
    assert call.type == "function_call" and call.arguments == deltas
    assert json.loads(deltas)["unit"] in ("celsius", "fahrenheit")
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_text_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "capital": {"type": "boolean"}},
        "required": ["city", "capital"],
        "additionalProperties": False,
    }
    resp = client.responses.create(
        model=DEFAULT_MODEL,
        input="Which city is the capital of France? Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        max_output_tokens=40,
    )
    assert resp.status == "completed"
    obj = json.loads(resp.output_text)
    assert set(obj) == {"city", "capital"} and isinstance(obj["capital"], bool)
    assert resp.text is not None and resp.text.format is not None
    assert resp.text.format.type == "json_schema"


def test_what_the_engine_cannot_do_names_the_input_item(embedded_gateway: ServerThread) -> None:
    r = httpx.post(
        f"{embedded_gateway.url}/v1/responses",
        json={
            "model": DEFAULT_MODEL,
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                    ],
                }
            ],
        },
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("input[0]")


def test_tokenize_counts_what_a_request_is_billed(
    embedded_gateway: ServerThread, client: openai.OpenAI
) -> None:
    url = embedded_gateway.url
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = httpx.post(
        f"{url}/tokenize",
        json={"model": DEFAULT_MODEL, "messages": messages, "return_token_strs": True},
    ).json()
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=1,
    )
    assert chat.usage is not None and tok["count"] == chat.usage.prompt_tokens
    assert tok["max_model_len"] == 2048 and len(tok["token_strs"]) == tok["count"]
    plain = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}).json()
    assert plain["count"] == len(plain["tokens"]) >= 2
    back = httpx.post(f"{url}/detokenize", json={"tokens": plain["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_bench_aligns_prompts_with_the_gateways_tokenize(embedded_gateway: ServerThread) -> None:
    """`gateway bench --align-prompts`: every chat prompt is billed exactly the asked length
    (the model's own tokenizer and chat template, through the gateway's /tokenize)."""
    import asyncio

    from loadgen.runner import LoadConfig, run_load

    cfg = LoadConfig(
        base_url=embedded_gateway.url,
        model=DEFAULT_MODEL,
        stream=False,
        concurrency=2,
        num_requests=4,
        prompt_tokens=40,
        align_prompts=True,
        max_tokens=1,
        progress=False,
    )
    result = asyncio.run(run_load(cfg))
    assert [r.ok for r in result.records] == [True] * 4
    assert {r.prompt_tokens for r in result.records} == {40}
