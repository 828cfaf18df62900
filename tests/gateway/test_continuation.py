"""Mid-stream continuation through a real gateway, driven with the official `openai` SDK:
workers (simulators, which continue their own text like a greedy model) die or stall after
some tokens; with `options.continue_streams` the client's answer is the one an
uninterrupted worker gives, in one response (one id, one role chunk, `[DONE]`), with usage
as docs/engines.md states it; without the option, with n = 2, or with no worker left, the
stream ends with an error event and no `[DONE]` as before. Also the option's checks at
config load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engines.upstream.continuation import Continuation
from gateway.catalog import CatalogError, parse_catalog
from simulator import SimServer
from tests.conftest import start_pool
from tests.gateway.test_api_sim import CHAT, SimThread

# Failures here are the point: never eject, never run out of retry budget.
OPTIONS = {
    "health_interval_s": 0.1,
    "start_timeout_s": 3.0,
    "eject_after_failures": 1000,
    "retry_budget_min": 1000,
    # Each worker then names its answer itself, so the id rewrite is what the test sees.
    "forward_request_id": False,
}


@pytest.fixture(scope="module")
def reference(sims: SimThread) -> Iterator[SimServer]:
    """A healthy worker: the uninterrupted answers."""
    server = sims.start(model="m", output_tokens=5)
    yield server
    sims.call(server.stop())


def _gateway(
    sims: SimThread, tmp: Path, n_workers: int, continue_streams: bool = True, **fault: Any
) -> tuple[Any, list[SimServer]]:
    workers = [sims.start(model="m", output_tokens=5, **fault) for _ in range(n_workers)]
    options = {**OPTIONS, "continue_streams": continue_streams}
    gw = start_pool(workers, options, tmp)
    return gw, workers


def _close(sims: SimThread, gw: Any, workers: list[SimServer]) -> None:
    gw.stop()
    for w in workers:
        sims.call(w.stop())


def _chat(base_url: str, **kw: Any) -> list[Any]:
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        return list(
            client.chat.completions.create(
                model="m",
                messages=CHAT,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                **kw,
            )
        )


def _completion(base_url: str, **kw: Any) -> list[Any]:
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        return list(
            client.completions.create(
                model="m",
                prompt="Once upon a time",
                stream=True,
                stream_options={"include_usage": True},
                **kw,
            )
        )


def _chat_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _finish(chunks: list[Any]) -> str | None:
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert all(r is None for r in reasons[:-1]), reasons
    return reasons[-1] if reasons else None


def _one_head(chunks: list[Any]) -> None:
    """Every chunk carries the first attempt's id, created, model and fingerprint."""
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {"m"}
    assert len({c.system_fingerprint for c in chunks}) == 1


def _continuations(gw: Any) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    line = 'gateway_engine_events_total{event="continuations",model="m"} '
    for row in text.splitlines():
        if row.startswith(line):
            return float(row[len(line) :])
    raise AssertionError("no continuations counter in /metrics")


def test_chat_worker_dropping_mid_stream_is_continued_into_the_same_answer(
    sims: SimThread, reference: SimServer, tmp_path: Path
) -> None:
    # Every worker closes after 3 token chunks: 7 tokens take 3 attempts (3 + 3 + 1).
    gw, workers = _gateway(sims, tmp_path, 3, drop_after=3)
    try:
        want = _chat(reference.url + "/v1", max_tokens=7, temperature=0)
        got = _chat(f"{gw.url}/v1", max_tokens=7, temperature=0)
        assert _chat_text(got) == _chat_text(want)
        assert len(_chat_text(got).split()) == 7
        _one_head(got)
        assert sum(1 for c in got if c.choices and c.choices[0].delta.role) == 1
        assert _finish(got) == _finish(want) == "length"
        prompt = want[-1].usage.prompt_tokens
        # Three attempts: the prompt, the prompt + 3 streamed, the prompt + 6 streamed.
        assert got[-1].usage.prompt_tokens == 3 * prompt + 3 + 6
        assert got[-1].usage.completion_tokens == 7
        assert got[-1].usage.total_tokens == 3 * prompt + 9 + 7
        assert sum(w.received_total for w in workers) == 3
        assert _continuations(gw) == 2
        # The raw stream ends with [DONE] and carries one id.
        raw = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT, "max_tokens": 5, "stream": True},
        ).content
        assert raw.endswith(b"data: [DONE]\n\n")
        events = [e for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
        assert len({json.loads(e[6:])["id"] for e in events}) == 1
        assert _continuations(gw) == 3
    finally:
        _close(sims, gw, workers)


def test_completions_worker_dropping_mid_stream_is_continued_to_its_natural_stop(
    sims: SimThread, reference: SimServer, tmp_path: Path
) -> None:
    gw, workers = _gateway(sims, tmp_path, 2, drop_after=3)
    try:
        # No max_tokens: the answer stops where the uninterrupted one does (5 tokens).
        want = _completion(reference.url + "/v1", temperature=0)
        got = _completion(f"{gw.url}/v1", temperature=0)
        text = "".join(c.choices[0].text for c in got if c.choices)
        assert text == "".join(c.choices[0].text for c in want if c.choices)
        assert len(text.split()) == 5
        _one_head(got)
        assert _finish(got) == _finish(want) == "stop"
        prompt = want[-1].usage.prompt_tokens
        assert got[-1].usage.prompt_tokens == 2 * prompt + 3
        assert got[-1].usage.completion_tokens == 5
        assert _continuations(gw) == 1
    finally:
        _close(sims, gw, workers)


@pytest.mark.parametrize("chat", [True, False])
def test_multi_token_deltas_are_continued_within_max_tokens_with_exact_usage(
    sims: SimThread, reference: SimServer, tmp_path: Path, chat: bool
) -> None:
    # Two tokens in every delta (vLLM under load); every worker closes after 5 deltas.
    # 21 tokens: 10 + 10 + 1, each continuation told the tokens left, not the deltas.
    gw, workers = _gateway(sims, tmp_path, 3, tokens_per_chunk=2, drop_after=5)
    try:
        call = _chat if chat else _completion
        want = call(reference.url + "/v1", max_tokens=21, temperature=0)
        got = call(f"{gw.url}/v1", max_tokens=21, temperature=0)
        text = _chat_text(got) if chat else "".join(c.choices[0].text for c in got if c.choices)
        want_text = (
            _chat_text(want) if chat else "".join(c.choices[0].text for c in want if c.choices)
        )
        assert text == want_text
        assert len(text.split()) == 21  # one word per simulator token: within max_tokens
        _one_head(got)
        assert _finish(got) == "length"
        assert _continuations(gw) == 2
        # Exact usage: what the workers generated, and each attempt's prompt.
        assert got[-1].usage.completion_tokens == 21
        assert sum(w.generation_tokens_total for w in workers) == 21
        prompt = want[-1].usage.prompt_tokens
        assert got[-1].usage.prompt_tokens == 3 * prompt + 10 + 20
        assert sum(w.prompt_tokens_total for w in workers) == got[-1].usage.prompt_tokens
    finally:
        _close(sims, gw, workers)


def test_a_worker_gone_mid_stream_is_continued_and_counted_by_another(
    sims: SimThread, reference: SimServer, tmp_path: Path
) -> None:
    # The health loop does not look again in time: the dead worker still counts as healthy,
    # and the tokens streamed are counted by a worker not yet tried.
    workers = [
        sims.start(model="m", output_tokens=5, itl_ms=100, tokens_per_chunk=2) for _ in range(2)
    ]
    gw = start_pool(
        workers, {**OPTIONS, "continue_streams": True, "health_interval_s": 60}, tmp_path
    )
    try:
        body = {
            "model": "m",
            "messages": CHAT,
            "max_tokens": 10,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                events.append(json.loads(line[6:]))
                texts = [
                    e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")
                ]
                if len(texts) == 2:  # 4 tokens in: the worker serving it goes away
                    (busy,) = [w for w in workers if w.running]
                    sims.call(busy.stop())
        want = _chat(reference.url + "/v1", max_tokens=10)
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )
        assert text == _chat_text(want)
        assert events[-1]["usage"]["completion_tokens"] == 10
        assert _continuations(gw) == 1
    finally:
        gw.stop()
        for w in workers:
            sims.call(w.stop())


def test_per_chunk_usage_is_the_count_when_the_worker_sends_it() -> None:
    """With vLLM's `continuous_usage_stats` (asked by the client) every chunk carries the
    worker's own count: that is the tokens streamed, whatever the deltas."""
    cont = Continuation(True, {"messages": CHAT, "max_tokens": 20, "min_tokens": 12})
    head = (
        '{"id":"c1","created":1,"model":"m","choices":[{"index":0,"delta":%s,"finish_reason":null}]'
    )
    usage = ',"usage":{"prompt_tokens":4,"completion_tokens":%d,"total_tokens":%d}}'
    role = head % '{"role":"assistant","content":""}' + usage % (0, 4)
    cont.runs.append(b"data: " + role.encode() + b"\n\n")
    for k in range(1, 4):  # three deltas of three tokens each
        chunk = head % '{"content":" a b c"}' + usage % (3 * k, 4 + 3 * k)
        cont.runs.append(b"data: " + chunk.encode() + b"\n\n")
    seen = cont.seen()
    assert (seen.text, seen.tokens, seen.final) == (" a b c" * 3, 9, False)
    body = cont.next_body(seen, 9)
    assert body is not None
    assert (body["max_tokens"], body["min_tokens"]) == (11, 3)
    assert body["messages"][-1] == {"role": "assistant", "content": " a b c" * 3}


def test_stall_mid_stream_is_continued(
    sims: SimThread, reference: SimServer, tmp_path: Path
) -> None:
    workers = [
        sims.start(model="m", output_tokens=5, stall_ms=30_000, stall_after=2) for _ in range(3)
    ]
    options = {**OPTIONS, "continue_streams": True, "read_timeout_s": 0.5}
    gw = start_pool(workers, options, tmp_path)
    try:
        want = _chat(reference.url + "/v1", max_tokens=5)
        got = _chat(f"{gw.url}/v1", max_tokens=5)  # 2 + 2 + 1 tokens
        assert _chat_text(got) == _chat_text(want)
        _one_head(got)
        assert _finish(got) == "length"
        assert _continuations(gw) == 2
        assert sum(w.received_total for w in workers) == 3
    finally:
        _close(sims, gw, workers)


def test_without_the_option_a_drop_is_an_error_event_and_no_done(
    sims: SimThread, tmp_path: Path
) -> None:
    gw, workers = _gateway(sims, tmp_path, 2, continue_streams=False, drop_after=3)
    try:
        with pytest.raises(openai.APIError):
            _chat(f"{gw.url}/v1", max_tokens=7)
        raw = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT, "max_tokens": 7, "stream": True},
        ).content
        assert b"[DONE]" not in raw
        assert b'"error"' in raw.split(b"\n\n")[-2]
        assert _continuations(gw) == 0
        assert sum(w.received_total for w in workers) == 2  # no attempt after the drop
    finally:
        _close(sims, gw, workers)


def test_n_2_and_no_worker_left_end_with_an_error_event(sims: SimThread, tmp_path: Path) -> None:
    gw, workers = _gateway(sims, tmp_path, 2, drop_after=3)
    try:
        # n = 2: not continued.
        raw = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT, "max_tokens": 7, "n": 2, "stream": True},
        ).content
        assert b"[DONE]" not in raw and b'"error"' in raw
        assert _continuations(gw) == 0
        # 12 tokens need 4 attempts of 3; with 2 workers the second drop has nowhere to go.
        with pytest.raises(openai.APIError):
            _chat(f"{gw.url}/v1", max_tokens=12)
        assert _continuations(gw) == 1
    finally:
        _close(sims, gw, workers)


def test_continuations_count_toward_max_retries(sims: SimThread, tmp_path: Path) -> None:
    workers = [sims.start(model="m", output_tokens=5, drop_after=3) for _ in range(3)]
    options = {**OPTIONS, "continue_streams": True, "max_retries": 1}
    gw = start_pool(workers, options, tmp_path)
    try:
        with pytest.raises(openai.APIError):  # 7 tokens need 2 continuations; 1 allowed
            _chat(f"{gw.url}/v1", max_tokens=7)
        assert _continuations(gw) == 1
        assert sum(w.received_total for w in workers) == 2
    finally:
        _close(sims, gw, workers)


def _problems(entry: dict[str, Any]) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog({"models": [entry]})
    return info.value.problems


def test_the_option_is_refused_where_it_cannot_apply() -> None:
    one = _problems(
        {"name": "a", "engine": "openai", "endpoints": ["http://127.0.0.1:1"],
         "options": {"continue_streams": True}}
    )  # fmt: skip
    assert any(p.startswith("models[0].options.continue_streams: a continuation") for p in one)
    lmdeploy = _problems(
        {"name": "a", "engine": "lmdeploy", "model": "m", "replicas": 2,
         "options": {"continue_streams": True}}
    )  # fmt: skip
    assert any(
        p.startswith("models[0].options.continue_streams: LMDeploy's chat API") for p in lmdeploy
    ), lmdeploy
    # Launched vLLM workers inherit it from the upstream engine.
    catalog = parse_catalog(
        {"models": [{"name": "a", "engine": "vllm", "model": "m", "replicas": 2,
                     "options": {"continue_streams": True}}]}
    )  # fmt: skip
    assert catalog.models[0].options["continue_streams"] is True
    single = _problems(
        {"name": "a", "engine": "sim", "options": {"continue_streams": True}}
    )  # fmt: skip
    assert any("options.continue_streams" in p for p in single), single
