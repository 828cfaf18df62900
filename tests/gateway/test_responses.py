"""`/v1/responses` through the gateway in front of simulator workers, driven with the real
`openai` SDK (`client.responses.create / retrieve / delete / input_items.list`, streaming):
the Response object and the event sequence, chaining with `previous_response_id`, per-key
scoping of stored responses (hashed keys in the real Redis), a spent budget, bad input
named by its field, a mid-stream failure ending in `response.failed`, and eviction by the
per-key size bound. The tool-call and real-model cases are in tests/test_responses_embedded.py;
chaining across front doors in tests/gateway/test_responses_workers.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, ServerThread, start_gateway
from tests.gateway.procs import SHARED_REDIS, clean_prefix, new_prefix
from tests.gateway.test_api_sim import SimThread
from tests.gateway.test_tenancy import settled

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def workers(sims: SimThread) -> Iterator[dict[str, Any]]:
    w = {
        "m": [sims.start(model="m", itl_ms=1, output_tokens=6) for _ in range(2)],
        "dropping": [sims.start(model="dropping", drop_after=3, itl_ms=1)],
    }
    yield w
    for group in w.values():
        for s in group:
            sims.call(s.stop())


def _models(w: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": name, "engine": "openai", "endpoints": [s.url for s in servers]}
        for name, servers in w.items()
    ]


@pytest.fixture(scope="module")
def gw(workers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """No keys: one process, the memory store."""
    server = start_gateway(_models(workers), tmp_path_factory.mktemp("r"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(
    workers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """Hashed keys and stored responses in the real Redis (a prefix of its own)."""
    prefix = new_prefix()
    server = start_gateway(
        _models(workers), tmp_path_factory.mktemp("k"), redis_url=SHARED_REDIS, redis_prefix=prefix
    )
    yield server
    server.stop()
    clean_prefix(prefix)


@pytest.fixture
def client(gw: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _key(url: str, **policy: Any) -> str:
    r = httpx.post(f"{url}/admin/keys", json=policy, headers=ADMIN)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_plain_text_response(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="m", input="What is the capital of France?")
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.status == "completed" and resp.model == "m"
    assert len(resp.output) == 1
    item = resp.output[0]
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert resp.output_text and len(resp.output_text.split()) == 6
    assert resp.usage is not None
    assert resp.usage.output_tokens == 6
    assert resp.usage.input_tokens == 6  # the simulator counts the prompt's words
    assert resp.usage.total_tokens == 12
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.store is True and resp.previous_response_id is None


def test_instructions_and_message_items_reach_the_engine_as_chat(
    client: openai.OpenAI, workers: dict[str, Any]
) -> None:
    resp = client.responses.create(
        model="m",
        instructions="Answer in one word.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "one two three"}]},
            {"type": "message", "role": "assistant", "content": "four"},
            {"role": "user", "content": "five six"},
        ],
        max_output_tokens=3,
        temperature=0.5,
        top_p=0.9,
        metadata={"team": "a"},
        user="u-1",
    )
    # Prompt words: "Answer in one word." (4) + 3 + 1 + 2 = 10.
    assert resp.usage is not None and resp.usage.input_tokens == 10
    assert resp.status == "incomplete"  # three tokens cut it short: finish_reason length
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.instructions == "Answer in one word." and resp.max_output_tokens == 3
    assert resp.metadata == {"team": "a"} and resp.user == "u-1"
    assert resp.temperature == 0.5 and resp.top_p == 0.9


def _collect(stream: Any) -> list[Any]:
    return list(stream)


def test_stream_events_in_order_and_final_equals_deltas(client: openai.OpenAI) -> None:
    events = _collect(client.responses.create(model="m", input="hello there", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert done.status == "completed" and done.output_text == deltas
    assert events[-4].text == deltas
    assert done.usage is not None and done.usage.output_tokens == 6
    # The streamed response is stored as it finished.
    assert client.responses.retrieve(done.id).output_text == deltas


def test_chain_retrieve_input_items_and_delete(client: openai.OpenAI) -> None:
    first = client.responses.create(model="m", input="alpha beta")
    second = client.responses.create(
        model="m", input="gamma", previous_response_id=first.id, instructions="be brief"
    )
    assert second.previous_response_id == first.id
    # The chain's prompt: alpha beta (2) + first answer (6) + gamma (1) + "be brief" (2).
    assert second.usage is not None and second.usage.input_tokens == 11
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    items = client.responses.input_items.list(second.id)
    kinds = [(i.type, getattr(i, "role", None)) for i in items.data]
    # Newest first: this turn's input, the first answer, the first input.
    assert kinds == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert items.data[0].content[0].text == "gamma"  # type: ignore[union-attr]
    asc = client.responses.input_items.list(second.id, order="asc", limit=1)
    assert len(asc.data) == 1 and asc.has_more
    assert asc.data[0].content[0].text == "alpha beta"  # type: ignore[union-attr]
    nxt = client.responses.input_items.list(second.id, order="asc", after=asc.last_id)
    assert [i.type for i in nxt.data] == ["message", "message"] and not nxt.has_more
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="m", input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    # The chain after it still works: each record holds its own context.
    third = client.responses.create(model="m", input="delta", previous_response_id=second.id)
    assert third.usage is not None and third.usage.input_tokens == 11 + 6 + 1 - 2


def test_store_false_is_not_retrievable(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="m", input="hello", store=False)
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_unknown_model_and_unknown_ids(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="nope", input="hi")
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 48)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_" + "0" * 48)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "file_search_call", "id": "x"}]}, "input[0].type"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c9", "output": "1"}]},
            "input[0].call_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "temperature": 3}, "temperature"),
        ({"input": "hi", "max_output_tokens": 10**9}, "max_output_tokens"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
            "text.format.schema",
        ),
        ({"input": "hi", "no_such_field": 1}, "no_such_field"),
        ({}, "input"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    gw: ServerThread, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{gw.url}/v1/responses", json={"model": "m", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_function_call_items_become_chat_tool_turns(gw: ServerThread) -> None:
    """A client-run tool loop without a stored chain: the call and its output go back as
    items; the engine gets an assistant tool call and a tool message (the simulator counts
    their words as the prompt)."""
    r = httpx.post(
        f"{gw.url}/v1/responses",
        json={
            "model": "m",
            "input": [
                {"role": "user", "content": "weather in Paris"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": "{\"city\": \"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny and warm"},
            ],
            "tools": [{"type": "function", "name": "get_weather",
                       "parameters": {"type": "object",
                                      "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
        },
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tools"][0]["name"] == "get_weather"
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["status"] == "completed"


def test_mid_stream_failure_ends_with_response_failed(client: openai.OpenAI) -> None:
    events = _collect(client.responses.create(model="dropping", input="hello", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None
    assert failed.output[0].status == "incomplete"


def test_metrics_count_the_route(gw: ServerThread, client: openai.OpenAI) -> None:
    client.responses.create(model="m", input="count me")
    text = httpx.get(f"{gw.url}/metrics").text
    ok = [
        line
        for line in text.splitlines()
        if line.startswith("gateway_requests_total")
        and 'route="responses"' in line
        and 'model="m"' in line
        and "2xx" in line
    ]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1


def test_another_key_gets_404_and_a_spent_budget_429(keyed: ServerThread) -> None:
    a, b = _key(keyed.url, name="a"), _key(keyed.url, name="b")
    with (
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=a, max_retries=0) as ca,
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=b, max_retries=0) as cb,
    ):
        resp = ca.responses.create(model="m", input="secret plans")
        assert ca.responses.retrieve(resp.id).output_text == resp.output_text
        with pytest.raises(openai.NotFoundError):
            cb.responses.retrieve(resp.id)
        with pytest.raises(openai.NotFoundError):
            cb.responses.input_items.list(resp.id)
        with pytest.raises(openai.NotFoundError):
            cb.responses.delete(resp.id)
        with pytest.raises(openai.NotFoundError):
            cb.responses.create(model="m", input="x", previous_response_id=resp.id)
        # Still there for its owner, chained through Redis.
        nxt = ca.responses.create(model="m", input="more", previous_response_id=resp.id)
        assert nxt.usage is not None and nxt.usage.input_tokens == 2 + 6 + 1
    # 20 tokens: each turn spends 2 + 6 (settled in the background: waited for), so the
    # budget is spent by the third turn at the latest, and then refused for good.
    made = httpx.post(f"{keyed.url}/admin/keys", json={"budget_tokens": 20}, headers=ADMIN)
    spent, key_id = made.json()["key"], made.json()["id"]
    ok = 0
    with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=spent, max_retries=0) as c:
        with pytest.raises(openai.RateLimitError) as e:
            for _ in range(4):
                c.responses.create(model="m", input="hello there")
                ok += 1
                settled(keyed.url, key_id)
        assert e.value.code == "insufficient_quota"
    assert 1 <= ok <= 3
    assert settled(keyed.url, key_id)["in_flight"] == 0


def test_size_bound_evicts_the_oldest(workers: dict[str, Any], tmp_path: Path) -> None:
    """Each record here is a few KB: a 9 KB bound per key keeps only the newest few."""
    server = start_gateway(_models(workers), tmp_path, responses_max_bytes_per_key=9 * 1024)
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            ids = [c.responses.create(model="m", input=f"turn {i}").id for i in range(12)]
            assert c.responses.retrieve(ids[-1]).id == ids[-1]
            with pytest.raises(openai.NotFoundError):
                c.responses.retrieve(ids[0])
    finally:
        server.stop()


def test_openapi_lists_the_routes(gw: ServerThread) -> None:
    doc = httpx.get(f"{gw.url}/openapi.json").json()
    paths = doc["paths"]
    assert "post" in paths["/v1/responses"]
    assert {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])
    assert "get" in paths["/v1/responses/{response_id}/input_items"]
    assert "post" in paths["/tokenize"] and "post" in paths["/detokenize"]
    assert json.dumps(doc)  # serialisable as a whole


def test_tokenize_and_detokenize_are_relayed_to_a_worker(gw: ServerThread) -> None:
    """vLLM's shapes, answered by the simulator's tokenizer (a word is a token) through the
    upstream engine; `model` may be left out only when one generate model is served."""
    r = httpx.post(
        f"{gw.url}/tokenize",
        json={"model": "m", "prompt": "one two three", "return_token_strs": True},
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["count"] == 3 and len(got["tokens"]) == 3
    assert got["token_strs"] == ["one", "two", "three"]
    chat = httpx.post(
        f"{gw.url}/tokenize",
        json={"model": "m", "messages": [{"role": "user", "content": "four five"}]},
    ).json()
    assert chat["count"] == 2 and chat["token_strs"] is None
    back = httpx.post(f"{gw.url}/detokenize", json={"model": "m", "tokens": got["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "one two three"}
    # Two generate models here: `model` is required; an unknown one is a 404.
    r = httpx.post(f"{gw.url}/tokenize", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{gw.url}/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # The worker's own refusal comes back as a 400.
    r = httpx.post(f"{gw.url}/detokenize", json={"model": "m", "tokens": ["a"]})
    assert r.status_code == 400, r.text


def test_field_list_covers_the_sdk() -> None:
    """Every field the SDK's `responses.create` can send is known to the allowlist."""
    from openai.types.responses import response_create_params as rc

    from gateway.allowlist import RESPONSES_FIELDS

    assert set(rc.ResponseCreateParamsBase.__annotations__) | {"stream"} <= RESPONSES_FIELDS


def test_cost_benchmark_dry_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/responses_cost.py, tiny, both ways (the benchmark is code too)."""
    import asyncio

    from bench import responses_cost

    best = asyncio.run(responses_cost.in_process(1, 20))
    assert set(best) == {"chat", "responses", "responses-nostore"}
    assert all(0 < v < 1e6 for v in best.values())
    assert responses_cost.main(["--dry-run"]) == 0
    assert "responses over chat:" in capsys.readouterr().out


def test_gpu_step_dry_runs(tmp_path: Path) -> None:
    """bench/gpu_responses.py --dry-run: the GPU bar's cases on two simulator replicas
    (the function call is the one case a simulator cannot answer)."""
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_responses.py"), "--dry-run",
         "--out", str(out), "--work", str(tmp_path / "work"), "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    cases = results["responses"]
    assert {k for k, v in cases.items() if not v["ok"]} == {"function_call"}, cases
    assert cases["tokenize"]["count"] == cases["tokenize"]["chat_prompt_tokens"]
    # Both replicas served (a request no worker answers, the unknown model's, notes None).
    assert len({w for w in results["workers_per_request"] if w}) == 2
