"""OpenTelemetry traces (`gateway.tracing`) received by a real OTLP/HTTP receiver
(`bench/otlp_receiver.py`, decoded with opentelemetry-proto).

Proves, through `gateway serve --workers 2` in front of two simulator workers: one chat
request with the client's `traceparent` gives a SERVER span parented to the client's span,
with the GenAI attributes, the key's id (never the key) and the worker's URL; child spans
for admission, the queue and the upstream attempt; and the simulator worker received a
`traceparent` of the same trace whose parent is that attempt's span. In process: a retry
shows as two attempt spans (the first failed), a stream has its first-token event, and
tracing is off (no tracer) without an endpoint.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.otlp_receiver import OTLPReceiver
from gateway.access_log import key_id
from gateway.settings import Settings
from gateway.tracing import Tracer, make_tracer, traces_url
from tests.conftest import start_gateway
from tests.gateway.procs import GatewayProcess
from tests.gateway.test_api_sim import SimThread

KEY = "sk-trace-test"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver().start()
    yield r
    r.stop()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["name"], []).append(s)
    return out


def _complete(spans: list[dict[str, Any]]) -> bool:
    names = {s["name"] for s in spans}
    return {"gateway.admit", "upstream attempt"} <= names and any(
        s["kind"] == "SERVER" for s in spans
    )


def test_workers_2_chat_span_joins_the_client_trace_and_reaches_the_worker(
    sims: SimThread, receiver: OTLPReceiver, tmp_path: Path
) -> None:
    workers = [sims.start(model="m", itl_ms=1, output_tokens=5) for _ in range(2)]
    models = [{"name": "m", "engine": "openai", "endpoints": [w.url for w in workers]}]
    gw = GatewayProcess(
        models,
        tmp_path,
        ("--workers", "2"),
        GATEWAY_API_KEYS=KEY,
        GATEWAY_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    try:
        gw.wait_ready()
        trace_id, client_span, header = _traceparent()
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0) as c:
            r = c.chat.completions.create(
                model="m",
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=4,
                temperature=0.5,
                extra_headers={"traceparent": header},
            )
        assert r.usage is not None
        spans = receiver.wait_for(trace_id, _complete)
    finally:
        gw.stop()
        for w in workers:
            sims.call(w.stop())

    names = _by_name(spans)
    (server,) = [s for s in spans if s["kind"] == "SERVER"]
    assert server["name"] == "chat m"
    assert server["parent_span_id"] == client_span  # the client's span is the parent
    assert server["service"] == "llm-gateway"
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "m"
    assert a["gen_ai.response.model"] == r.model
    assert a["gen_ai.response.id"] == r.id
    assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == r.usage.completion_tokens == 4
    assert a["gen_ai.response.finish_reasons"] == [r.choices[0].finish_reason]
    assert a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["http.response.status_code"] == 200
    assert a["gateway.key_id"] == key_id(f"Bearer {KEY}".encode())
    assert a["gateway.worker"] in {w.url for w in workers}
    assert a["gateway.retries"] == 0
    # The key itself appears nowhere in what was exported.
    assert KEY not in repr(spans)

    # Children: admission, the queue, one attempt on the worker the server span names.
    for child in ("gateway.admit", "gateway.queue", "upstream attempt"):
        (span,) = names[child]
        assert span["parent_span_id"] == server["span_id"]
        assert span["trace_id"] == trace_id
        assert server["start_ns"] <= span["start_ns"] <= span["end_ns"] <= server["end_ns"]
    (attempt,) = names["upstream attempt"]
    assert attempt["kind"] == "CLIENT"
    assert attempt["attributes"]["gateway.worker"] == a["gateway.worker"]
    assert attempt["attributes"]["gateway.attempt.kind"] == "first"
    assert attempt["attributes"]["gateway.route.reason"]  # the routing rule that picked it

    # The worker got the same trace, parented to the attempt's span (as vLLM would parent
    # its own spans).
    (worker,) = [w for w in workers if w.url == a["gateway.worker"]]
    got = [tp.split("-") for tp in worker.traceparents if tp.split("-")[1] == trace_id]
    assert got == [["00", trace_id, attempt["span_id"], "01"]]
    other = next(w for w in workers if w is not worker)
    assert all(tp.split("-")[1] != trace_id for tp in other.traceparents)


@pytest.fixture(scope="module")
def traced(
    sims: SimThread, receiver: OTLPReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """In process: model "m" on a failing worker and a healthy one (failures retried),
    model "s" on one streaming worker."""
    failing = sims.start(model="m", error_rate=1.0, error_status=502)
    healthy = sims.start(model="m", itl_ms=1, output_tokens=6)
    streamer = sims.start(model="s", ttft_ms=20, itl_ms=2, output_tokens=6)
    models = [
        {
            "name": "m",
            "engine": "openai",
            "endpoints": [failing.url, healthy.url],
            # Round-robin ties: the first request goes to the failing worker first.
            "routing": {"scorers": {"least_outstanding": 1}},
        },
        {"name": "s", "engine": "openai", "endpoints": [streamer.url]},
    ]
    gw = start_gateway(models, tmp_path_factory.mktemp("traced"), otlp_endpoint=receiver.url)
    yield {"gw": gw, "failing": failing, "healthy": healthy, "streamer": streamer}
    gw.stop()
    for s in (failing, healthy, streamer):
        sims.call(s.stop())


def test_a_retry_is_two_attempt_spans(traced: dict[str, Any], receiver: OTLPReceiver) -> None:
    gw = traced["gw"]
    failing, healthy = traced["failing"], traced["healthy"]
    # Send until one request met the failing worker first (ties rotate between them).
    for _ in range(4):
        trace_id, client_span, header = _traceparent()
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT, "max_tokens": 3},
            headers={"traceparent": header},
            timeout=30,
        )
        assert r.status_code == 200
        spans = receiver.wait_for(trace_id, _complete)
        attempts = _by_name(spans)["upstream attempt"]
        if len(attempts) == 2:
            break
    else:
        pytest.fail("no request was retried")
    first, second = sorted(attempts, key=lambda s: s["start_ns"])
    assert first["attributes"]["gateway.worker"] == failing.url
    assert first["status"]["code"] == 2  # ERROR
    assert first["attributes"]["gateway.attempt.kind"] == "first"
    assert second["attributes"]["gateway.worker"] == healthy.url
    assert second["attributes"]["gateway.attempt.kind"] == "retry"
    assert second["attributes"]["gateway.route.reason"] == "retry"
    assert first["end_ns"] <= second["start_ns"]
    (server,) = [s for s in spans if s["kind"] == "SERVER"]
    assert server["attributes"]["gateway.retries"] == 1
    assert server["attributes"]["gateway.worker"] == healthy.url
    assert server["parent_span_id"] == client_span
    # Each worker saw its own attempt's span as the parent.
    for worker, attempt in ((failing, first), (healthy, second)):
        assert f"00-{trace_id}-{attempt['span_id']}-01" in worker.traceparents


def test_a_continued_stream_is_one_attempt_span_per_worker(
    sims: SimThread, receiver: OTLPReceiver, tmp_path: Path
) -> None:
    # Every worker closes after 3 token chunks: 7 tokens take 3 attempts (3 + 3 + 1).
    workers = [sims.start(model="m", output_tokens=5, drop_after=3) for _ in range(3)]
    options = {"continue_streams": True, "eject_after_failures": 1000, "retry_budget_min": 1000}
    models = [
        {"name": "m", "engine": "openai", "endpoints": [w.url for w in workers], "options": options}
    ]
    gw = start_gateway(models, tmp_path, otlp_endpoint=receiver.url)
    try:
        trace_id, client_span, header = _traceparent()
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
            chunks = list(
                c.chat.completions.create(
                    model="m",
                    messages=CHAT,  # type: ignore[arg-type]
                    max_tokens=7,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers={"traceparent": header},
                )
            )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
        spans = receiver.wait_for(trace_id, _complete)
    finally:
        gw.stop()
        for w in workers:
            sims.call(w.stop())
    attempts = sorted(_by_name(spans)["upstream attempt"], key=lambda s: s["start_ns"])
    kinds = [a["attributes"]["gateway.attempt.kind"] for a in attempts]
    assert kinds == ["first", "continuation", "continuation"]
    assert [a["status"]["code"] for a in attempts] == [2, 2, 0]  # the first two broke
    assert len({a["attributes"]["gateway.worker"] for a in attempts}) == 3
    (server,) = [s for s in spans if s["kind"] == "SERVER"]
    assert server["parent_span_id"] == client_span
    assert server["attributes"]["gen_ai.usage.output_tokens"] == 7
    assert server["attributes"]["gateway.retries"] == 2
    # Each worker's own spans would hang under the attempt that went to it.
    for a in attempts:
        (w,) = [w for w in workers if w.url == a["attributes"]["gateway.worker"]]
        assert f"00-{trace_id}-{a['span_id']}-01" in w.traceparents


def test_a_stream_has_its_first_token_and_a_root_span_without_traceparent(
    traced: dict[str, Any], receiver: OTLPReceiver
) -> None:
    gw, streamer = traced["gw"], traced["streamer"]
    before = len(streamer.traceparents)
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        chunks = list(
            c.chat.completions.create(
                model="s",
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks
    # No traceparent from the client: the gateway's span is the root of a new trace, and
    # the worker got that trace.
    (sent,) = list(streamer.traceparents)[before:]
    trace_id = sent.split("-")[1]
    spans = receiver.wait_for(trace_id, _complete)
    (server,) = [s for s in spans if s["kind"] == "SERVER"]
    assert server["parent_span_id"] == ""
    a = server["attributes"]
    assert a["gateway.stream"] is True
    assert a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.response.model"] == "s"
    (event,) = server["events"]
    assert event["name"] == "gen_ai.first_token"
    assert server["start_ns"] < event["time_ns"] <= server["end_ns"]
    assert a["gen_ai.server.time_to_first_token"] > 0


def test_an_unsampled_parent_is_forwarded_and_not_exported(
    traced: dict[str, Any], receiver: OTLPReceiver
) -> None:
    gw, streamer = traced["gw"], traced["streamer"]
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "s", "messages": CHAT, "max_tokens": 2},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"},
        timeout=30,
    )
    assert r.status_code == 200
    got = [tp for tp in streamer.traceparents if tp.split("-")[1] == trace_id]
    assert len(got) == 1 and got[0].endswith("-00")  # the worker records nothing either
    # A sampled request after it is exported, the unsampled one never.
    sampled, _span, header = _traceparent()
    httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "s", "messages": CHAT, "max_tokens": 2},
        headers={"traceparent": header},
        timeout=30,
    )
    receiver.wait_for(sampled, _complete)
    assert receiver.trace(trace_id) == []


def test_off_without_an_endpoint_and_sampling_ratio() -> None:
    assert make_tracer(Settings()) is None
    assert make_tracer(Settings(otlp_endpoint="http://c:4318", otel_sdk_disabled=True)) is None
    on = make_tracer(Settings(otlp_endpoint="http://c:4318/"))
    assert on is not None and on.url == "http://c:4318/v1/traces"
    assert traces_url(Settings(otel_endpoint="http://c:4318")) == "http://c:4318/v1/traces"
    assert traces_url(Settings(otel_traces_endpoint="http://c/t")) == "http://c/t"
    none = Tracer(Settings(trace_sample=0.0), "http://c")
    assert all(none.begin(None).flags == b"00" for _ in range(50))
    every = Tracer(Settings(trace_sample=1.0), "http://c")
    assert all(every.begin(None).flags == b"01" for _ in range(50))
    # A malformed traceparent starts a new trace; a valid one is kept, sampled or not.
    t = none.begin(b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01")
    assert t.trace_id != b"0" * 32 and t.parent_id == b""
    tid, sid = secrets.token_hex(16).encode(), secrets.token_hex(8).encode()
    t = none.begin(b"00-%s-%s-01" % (tid, sid))
    assert (t.trace_id, t.parent_id, t.flags) == (tid, sid, b"01")
    assert every.begin(b"00-%s-%s-00" % (tid, sid)).flags == b"00"


def test_the_bench_runs() -> None:
    from bench.tracing_cost import main

    assert main(["--dry-run"]) == 0


def test_the_gpu_trace_check_runs_dry(tmp_path: Path) -> None:
    """bench/gpu_trace.py (docs/gpu.md) with the simulator in place of vLLM: the gateway's
    spans reach the receiver and the worker got each attempt's span as its parent."""
    from bench.gpu_trace import main

    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists()
