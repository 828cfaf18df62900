"""What tracing costs a request, in CPU µs: on the request path and in the batch.

    .venv/bin/python bench/tracing_cost.py [--requests 20000] [--dry-run]

Owns one measurement, on the gateway's own objects (a real `Gateway` whose model is never
started): a request's `RequestRecord` life as the hot path lives it — open and identify
(with a client `traceparent`), begin, admitted, the engine's `TraceContext.attempt` (the
`traceparent` it sends), finished (metrics, `Tracer.end`; the access log off, it costs
the same either way) — with tracing off and on at a 100 % sample; the difference is the
path's cost. Then the batch: `Tracer.encode_pending` (each request's four spans — server,
admit, queue, one attempt — built and encoded) and `encode_request` (the export body),
per request; the POST itself is not timed. For reference, two ways the module does not
do it, with the OpenTelemetry SDK (the dev extra): the same four spans made with its
tracer on the path, and its `ReadableSpan`s encoded by its OTLP encoder (`encode_spans`,
what `OTLPSpanExporter` runs per batch). Beside it, the status page's series
(`Series.record`, on every request's finish whether tracing is on or not). Process CPU
time, best of three; this machine's noise moves the figures by ±20 %. Results go in
docs/benchmarks.md, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.base import GenerateRequest, Usage  # noqa: E402
from gateway.api.requests import Incoming, RequestRecord  # noqa: E402
from gateway.catalog import parse_catalog  # noqa: E402
from gateway.series import Series  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.state import Gateway  # noqa: E402

BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index"'
    b':0,"message":{"role":"assistant","content":"' + b"word " * 16 + b'"},"logprobs":null,'
    b'"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":16,'
    b'"total_tokens":21}}'
)
WORKER = "http://127.0.0.1:9000"
CHUNK = 2000


def _gateway(traced: bool) -> Gateway:
    catalog = parse_catalog(
        {"models": [{"name": "m", "engine": "openai", "endpoints": [WORKER]}]},
        base_dir=REPO,
    )
    # The access log off: it costs the same either way, and its batch would write here.
    settings = Settings(otlp_endpoint="http://127.0.0.1:4318" if traced else "", access_log=False)
    return Gateway(settings, catalog)


def _requests(gw: Gateway, n: int) -> Callable[[], None]:
    """n requests' RequestRecord lives, as the hot path drives them."""
    header = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01".encode()
    scope = {
        "headers": [
            (b"authorization", b"Bearer sk-bench-key"),
            (b"content-type", b"application/json"),
            (b"traceparent", header),
        ]
    }
    usage = Usage(5, 16)
    body = {"model": "m", "messages": [], "max_tokens": 16, "temperature": 0.5}

    def run() -> None:
        for i in range(n):
            record = RequestRecord(gw, "chat", time.perf_counter())
            inc = Incoming(scope, None)  # type: ignore[arg-type]
            record.identify(inc, f"req-{i}")
            record.model = "m"
            record.begin()
            if record.trace is not None:  # admit.py's mark after the queue
                record.trace.admitted = time.perf_counter()
            req = GenerateRequest("chat", body, "m", None, record.rid, 0, trace=record.trace)
            record.req = req
            tc = req.trace
            if tc is not None:  # engines.upstream.send: one attempt, its header
                _head = b"traceparent: %s\r\n" % tc.attempt(WORKER, "least_loaded")
            req.worker = WORKER
            record.tails = (BODY,)
            record.finished(usage, None, False)

    return run


def _cpu(fn: Callable[[], None]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


async def measure(n: int) -> dict[str, float]:
    """µs per request: path off, path on, the batch; the SDK's two references."""
    from gateway.otlp import encode_request

    off, on = _gateway(False), _gateway(True)
    tracer = on.tracer
    assert tracer is not None and off.tracer is None
    path_off = path_on = batch = 0.0
    items: list[tuple[Any, ...]] = []
    # In rounds of CHUNK requests and their batch, as the gateway's one-second batches.
    for k in range(0, n, CHUNK):
        m = min(CHUNK, n - k)
        path_off += _cpu(_requests(off, m))
        path_on += _cpu(_requests(on, m))
        items += list(tracer._pending)[:200]  # for the SDK reference below
        encoded: list[bytes] = []

        def encode(encoded: list[bytes] = encoded, m: int = m) -> None:
            encoded += tracer.encode_pending(m)
            for j in range(0, len(encoded), 512):
                encode_request(tracer.resource, "gateway.tracing", encoded[j : j + 512])

        batch += _cpu(encode)
        assert len(encoded) == 4 * m, len(encoded)
    series = Series(lambda: {})
    usage = Usage(5, 16)

    def record() -> None:
        for i in range(n):
            series.record("m", 200, 0.0123, 0.0031 if i % 2 else None, usage)

    return {
        "series": _cpu(record) / n * 1e6,
        "path_off": path_off / n * 1e6,
        "path_on": path_on / n * 1e6,
        "batch": batch / n * 1e6,
        "sdk_path": _sdk_path(n),
        "sdk_batch": _sdk_batch(tracer, items),
    }


def _sdk_batch(tracer: Any, items: list[tuple[Any, ...]]) -> float:
    """µs per request for the SDK's way of the batch: `ReadableSpan`s of the same spans,
    encoded by its OTLP encoder."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    resource = Resource(dict(tracer.resource))
    scope = InstrumentationScope("gateway.tracing")
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)

    def run() -> None:
        spans = []
        for item in items:
            for s in tracer.spans(*item):
                tid, sid, parent, name, kind, start, end, attrs, events, _c, _m, _f = s
                spans.append(
                    ReadableSpan(
                        name=name,
                        context=trace.SpanContext(
                            int.from_bytes(tid), int.from_bytes(sid), False, flags
                        ),
                        parent=trace.SpanContext(
                            int.from_bytes(tid), int.from_bytes(parent), True, flags
                        )
                        if parent
                        else None,
                        resource=resource,
                        attributes=dict(attrs),
                        events=[Event(e, {}, t) for t, e in events],
                        kind=trace.SpanKind(kind - 1),
                        start_time=start,
                        end_time=end,
                        instrumentation_scope=scope,
                    )
                )
        encode_spans(spans).SerializeToString()

    return _cpu(run) / max(1, len(items)) * 1e6


def _sdk_path(n: int) -> float:
    """µs per request for the same four spans made with the SDK's tracer on the path (a
    processor that drops them: only the making is timed)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

    class _Drop(SpanExporter):
        def export(self, spans: Any) -> Any:
            return None

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Drop()))
    t = provider.get_tracer("bench")
    parent = trace.set_span_in_context(
        trace.NonRecordingSpan(
            trace.SpanContext(
                int(secrets.token_hex(16), 16),
                int(secrets.token_hex(8), 16),
                True,
                trace.TraceFlags(1),
            )
        )
    )

    def run() -> None:
        for _ in range(n):
            server = t.start_span("chat m", parent, kind=trace.SpanKind.SERVER)
            ctx = trace.set_span_in_context(server)
            for name in ("gateway.admit", "gateway.queue"):
                t.start_span(name, ctx).end()
            attempt = t.start_span("upstream attempt", ctx, kind=trace.SpanKind.CLIENT)
            attempt.set_attributes(
                {"gateway.worker": WORKER, "gateway.route.reason": "least_loaded"}
            )
            attempt.end()
            server.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "m",
                    "gen_ai.response.model": "m",
                    "gen_ai.usage.input_tokens": 5,
                    "gen_ai.usage.output_tokens": 16,
                    "gen_ai.response.finish_reasons": ["length"],
                    "gen_ai.request.max_tokens": 16,
                    "http.response.status_code": 200,
                    "gateway.key_id": "0123456789ab",
                    "gateway.worker": WORKER,
                }
            )
            server.end()

    cpu = _cpu(run)
    provider.shutdown()
    return cpu / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--dry-run", action="store_true", help="a few requests, to check it runs")
    a = p.parse_args(argv)
    n = 50 if a.dry_run else a.requests
    runs = [asyncio.run(measure(n)) for _ in range(1 if a.dry_run else 3)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    added = best["path_on"] - best["path_off"]
    print(
        f"tracing, {n} requests, best of {len(runs)} (CPU µs per request):\n"
        f"  request path, tracing off           {best['path_off']:7.2f}\n"
        f"  request path, tracing on (100 %)    {best['path_on']:7.2f}  (+{added:.2f})\n"
        f"  batch: 4 spans built and encoded    {best['batch']:7.2f}\n"
        f"  added in all (path + batch)         {added + best['batch']:7.2f}\n"
        f"  reference, SDK: spans on the path   {best['sdk_path']:7.2f}\n"
        f"  reference, SDK: ReadableSpan+encode {best['sdk_batch']:7.2f}\n"
        f"  status page series, Series.record   {best['series']:7.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
