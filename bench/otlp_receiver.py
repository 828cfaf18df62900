"""A test OTLP/HTTP trace receiver: what a collector (Jaeger, Tempo, the OpenTelemetry
Collector) receives on `POST /v1/traces`, decoded with opentelemetry-proto.

aiohttp on 127.0.0.1 in a thread of its own. Takes protobuf (`application/x-protobuf`,
what the Python and vLLM exporters send, gzip or not) and OTLP/JSON (`application/json`);
`spans` holds every span received as a plain dict (ids as lower-case hex, attributes
decoded to Python values, the resource's `service.name`). Used by the suite
(tests/gateway/test_tracing.py), by the GPU check (bench/gpu_trace.py, docs/gpu.md) and
by hand: `python bench/otlp_receiver.py 4318` prints each span it receives.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def decode(body: bytes, content_type: str, encoding: str = "") -> list[dict[str, Any]]:
    """The spans of one OTLP export request, as dicts."""
    if encoding == "gzip":
        body = gzip.decompress(body)
    req = ExportTraceServiceRequest()
    if content_type.startswith("application/json"):
        json_format.Parse(body, req)
    else:
        req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "name": s.name,
                        "kind": _KINDS.get(s.kind, str(s.kind)),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                        "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                        "events": [
                            {
                                "name": e.name,
                                "time_ns": e.time_unix_nano,
                                "attributes": {kv.key: _value(kv.value) for kv in e.attributes},
                            }
                            for e in s.events
                        ],
                        "status": {"code": s.status.code, "message": s.status.message},
                    }
                )
    return out


class OTLPReceiver:
    """`POST /v1/traces` on a loopback port; `spans` grows as exports arrive."""

    def __init__(self, on_span: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.spans: list[dict[str, Any]] = []
        self.exports = 0
        self.content_types: list[str] = []
        self._on_span = on_span
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _traces(self, request: web.Request) -> web.Response:
        ctype = request.headers.get("content-type", "")
        spans = decode(await request.read(), ctype, request.headers.get("content-encoding", ""))
        with self._lock:
            self.exports += 1
            self.content_types.append(ctype)
            self.spans.extend(spans)
        if self._on_span is not None:
            for s in spans:
                self._on_span(s)
        answer = ExportTraceServiceResponse()
        if ctype.startswith("application/json"):
            return web.json_response(json_format.MessageToDict(answer))
        return web.Response(body=answer.SerializeToString(), content_type="application/x-protobuf")

    async def _start(self, port: int) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def start(self, port: int = 0) -> OTLPReceiver:
        self._thread.start()
        fut: Future[str] = asyncio.run_coroutine_threadsafe(self._start(port), self.loop)
        self.url = fut.result(timeout=30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(
        self, trace_id: str, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
    ) -> list[dict[str, Any]]:
        """The spans of `trace_id` once `check` accepts them (polled)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.trace(trace_id)
            if check(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"trace {trace_id}: only {[s['name'] for s in spans]}")
            time.sleep(0.1)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318

    def show(s: dict[str, Any]) -> None:
        print(
            s["service"],
            s["trace_id"],
            s["span_id"],
            "parent",
            s["parent_span_id"] or "-",
            s["kind"],
            s["name"],
            flush=True,
        )

    r = OTLPReceiver(show).start(port)
    print(f"OTLP/HTTP receiver on {r.url}/v1/traces", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        r.stop()


if __name__ == "__main__":
    main()
