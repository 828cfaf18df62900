"""OpenTelemetry traces of the API requests, joined with the workers' own (vLLM's).

Owns `Tracer`: whether a request is traced (an incoming W3C `traceparent` is honoured: its
trace id is kept, its span becomes the parent, its sampled flag decides, as OpenTelemetry's
parent-based sampler; without one, `GATEWAY_TRACE_SAMPLE` does), the ids, and turning
what a finished request noted into spans, exported in batches over OTLP/HTTP
(`gateway.otlp`). Off — nothing imported, one attribute check per request — unless
`GATEWAY_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set (`gateway.settings`,
which also reads the other standard `OTEL_*` variables the export uses).

The spans of one request (GenAI semantic conventions, OpenTelemetry's published names):

    {operation} {model}    SERVER, parent: the client's `traceparent`. gen_ai.operation.name
                           (chat | text_completion | embeddings), gen_ai.request.model,
                           gen_ai.response.model, gen_ai.response.id,
                           gen_ai.response.finish_reasons, gen_ai.usage.input_tokens /
                           output_tokens, gen_ai.request.max_tokens / temperature / top_p /
                           seed, gen_ai.server.time_to_first_token, http.response.status_code,
                           error.type, gateway.key_id (the key's id, never the key),
                           gateway.worker (the URL that answered), gateway.retries,
                           gateway.request_id; event `gen_ai.first_token` (streams)
      gateway.admit        authenticate, parse, screen, key limits (INTERNAL)
      gateway.queue        the model's admission queue (INTERNAL)
      upstream attempt     one per try on a worker (CLIENT): gateway.worker (its URL),
                           gateway.route.reason (the routing rule that picked it),
                           gateway.attempt.kind (first | retry | continuation), the error
                           that ended it; its span id is the parent in the `traceparent`
                           sent to that worker, so vLLM's spans hang under the attempt

Why not the SDK's tracer on the request path, nor its span objects in the batch: measured
(bench/tracing_cost.py, docs/benchmarks.md, "Tracing"), the SDK's four spans of a request
cost about 200 µs of CPU made on the path, and its `ReadableSpan`s plus its OTLP encoder
about 500 µs in the batch. Here the path notes times and facts it already has in the
request's `RequestTrace` (which is also the engine's `TraceContext`) and hands one tuple
over when it ends (`Tracer.end`); a callback on the event loop encodes pending requests in
slices of `SLICE` (so no slice holds the loop long) and sends one export per
`BATCH_EVERY_S`. What the answer's bytes say (response model, id, finish reason) is read
there, not on the path. Nothing is retried: a failed export is dropped and counted.

Does not own the request's record (`gateway.api.requests`), the engines' attempts
(`engines.base.TraceContext`, filled by `engines.upstream.send`) or the wire format
(`gateway.otlp`).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engines.base import Attempt, GenerateRequest, ServingError, TraceContext, Usage
from gateway.access_log import finish_reason, key_id
from gateway.otlp import (
    CLIENT,
    INTERNAL,
    SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    Attributes,
    OTLPSender,
    SpanData,
    encode_request,
    encode_span,
    parse_headers,
)

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("gateway.tracing")

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_PATH = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
_MODEL = re.compile(rb'"model":\s*"((?:[^"\\]|\\.)*)"')
_ID = re.compile(rb'"id":\s*"((?:[^"\\]|\\.)*)"')
_PARAMS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
)
SCOPE = "gateway.tracing"
# Requests waiting to be encoded; past this, new ones are dropped (and counted).
MAX_PENDING = 8192
# One export at most this often (more often when a batch fills up).
BATCH_EVERY_S = 1.0
# Requests encoded per event-loop callback: a slice takes well under a millisecond.
SLICE = 32
# Spans per export request (OTel's default batch size).
BATCH_SPANS = 512


@dataclass(slots=True)
class RequestTrace(TraceContext):
    """One traced request: the engine's `TraceContext` (trace id, flags, attempts) plus the
    gateway's own span, its parent and the admission marks."""

    span_id: bytes = b""
    parent_id: bytes = b""  # the client's span (empty: the gateway's span is the root)
    queued: float = 0.0  # entered the model's admission queue (perf_counter)
    admitted: float = 0.0  # left it


def traces_url(settings: Settings) -> str | None:
    """The OTLP/HTTP traces URL, or None when tracing is off."""
    if settings.otel_sdk_disabled:
        return None
    if settings.otlp_endpoint.strip():
        return _traces_path(settings.otlp_endpoint)
    if settings.otel_traces_endpoint.strip():
        return settings.otel_traces_endpoint.strip()
    if settings.otel_endpoint.strip():
        return _traces_path(settings.otel_endpoint)
    return None


def _traces_path(base: str) -> str:
    url = base.strip().rstrip("/")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


def _resource(settings: Settings) -> Attributes:
    """The resource: OTEL_RESOURCE_ATTRIBUTES, then the service name over it (as the SDK)."""
    attrs = dict(parse_headers(settings.otel_resource_attributes))
    attrs["service.name"] = settings.otel_service_name
    attrs.setdefault("telemetry.sdk.name", "llm-gateway")
    attrs.setdefault("telemetry.sdk.language", "python")
    out: Attributes = list(attrs.items())
    out.append(("process.pid", os.getpid()))
    return out


def _span_id() -> bytes:
    return b"%016x" % (random.getrandbits(64) or 1)


class TracedRecord(Protocol):
    """What `Tracer.end` reads of a finished request (`gateway.api.requests.RequestRecord`
    has it; a protocol, so this module does not import the record that calls it)."""

    trace: RequestTrace | None
    route: str
    model: str
    rid: str
    ticket: Any
    auth: bytes | None
    adapter: str | None
    stream: bool
    start: float
    ttft: float | None
    tails: tuple[bytes | None, ...]
    req: GenerateRequest | None


class Tracer:
    """The gateway's tracing (one per process: `Gateway.tracer`, None when off)."""

    def __init__(self, settings: Settings, url: str):
        self.url = url
        self.sample = settings.trace_sample
        self.resource = _resource(settings)
        self.sender = OTLPSender(
            url,
            parse_headers(settings.otel_headers),
            settings.otel_timeout_ms / 1000,
            settings.otel_compression,
        )
        self._pending: deque[tuple[Any, ...]] = deque()
        self._encoded: list[bytes] = []
        self._last_sent = 0.0
        self._handle: asyncio.Handle | None = None
        self.dropped = 0  # requests not exported: the queue was full
        self.traced = 0  # requests encoded
        # perf_counter → Unix nanoseconds (spans carry wall time; the path reads the
        # monotonic clock it already reads).
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    # -- the request path --------------------------------------------------------------

    def begin(self, traceparent: bytes | None) -> RequestTrace:
        """A request's trace: the client's context when it sent a valid one, else a new
        trace sampled at `sample`."""
        if traceparent is not None:
            m = _TRACEPARENT.fullmatch(traceparent.strip())
            if m is not None and m[1] != b"ff" and m[2] != _ZERO_TRACE and m[3] != _ZERO_SPAN:
                flags = b"01" if int(m[4], 16) & 1 else b"00"
                return RequestTrace(m[2], flags, [], _span_id(), m[3])
        sampled = self.sample >= 1.0 or random.random() < self.sample
        trace_id = b"%032x" % (random.getrandbits(128) or 1)
        return RequestTrace(trace_id, b"01" if sampled else b"00", [], _span_id())

    def end(
        self, r: TracedRecord, status: int, usage: Usage | None, error: ServingError | None
    ) -> None:
        """Hand a finished request over: one tuple; its spans are made in the batch."""
        trace = r.trace
        if trace is None or trace.flags != b"01":
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(
            (trace, r.route, r.model, r.rid, r.ticket, r.auth, r.adapter, r.stream, r.start,
             time.perf_counter(), r.ttft, status, usage, error, r.tails, r.req)
        )  # fmt: skip

    # -- the batch -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch callbacks (in the app's lifespan)."""
        self._handle = asyncio.get_running_loop().call_later(BATCH_EVERY_S, self._step)

    def _step(self) -> None:
        """Encode a slice of what is pending; export when a batch is due; reschedule."""
        loop = asyncio.get_running_loop()
        self._encoded += self.encode_pending(SLICE)
        now = loop.time()
        due = len(self._encoded) >= BATCH_SPANS or now - self._last_sent >= BATCH_EVERY_S
        if self._encoded and due and not self.sender.busy:
            self._ship(now)
        if self._pending and len(self._encoded) < 4 * BATCH_SPANS:
            self._handle = loop.call_soon(self._step)
        else:
            self._handle = loop.call_later(BATCH_EVERY_S / 4, self._step)

    def _ship(self, now: float) -> None:
        batch, self._encoded = self._encoded[:BATCH_SPANS], self._encoded[BATCH_SPANS:]
        self.sender.send(encode_request(self.resource, SCOPE, batch))
        self._last_sent = now

    def encode_pending(self, limit: int) -> list[bytes]:
        """The encoded spans of up to `limit` pending requests."""
        out: list[bytes] = []
        pending = self._pending
        for _ in range(min(limit, len(pending))):
            item = pending.popleft()
            try:
                out += [encode_span(s) for s in self.spans(*item)]
            except Exception:  # a bug here must never reach a request
                log.exception("encoding a trace's spans failed")
                continue
            self.traced += 1
        return out

    async def stop(self) -> None:
        """Export everything pending, then close the sender."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._encoded += self.encode_pending(len(self._pending))
        loop = asyncio.get_running_loop()
        while self._encoded:
            await self.sender.close()  # waits for the export in flight
            self._ship(loop.time())
        await self.sender.close()

    # -- spans ---------------------------------------------------------------------------

    def _ns(self, perf: float) -> int:
        return int(perf * 1e9) + self._offset_ns

    def spans(
        self,
        trace: RequestTrace,
        route: str,
        model: str,
        rid: str,
        ticket: Any,
        auth: bytes | None,
        adapter: str | None,
        stream: bool,
        start: float,
        end: float,
        ttft: float | None,
        status: int,
        usage: Usage | None,
        error: ServingError | None,
        tails: tuple[bytes | None, ...],
        req: Any,
    ) -> list[SpanData]:
        """The spans of one finished request (see the module docstring)."""
        tid = binascii.unhexlify(trace.trace_id)
        server = binascii.unhexlify(trace.span_id)
        operation = _OPERATION.get(route, route)
        path = _PATH.get(route, route)
        requested = req.model if req is not None else model
        attrs: Attributes = [
            ("gen_ai.operation.name", operation),
            ("gen_ai.request.model", requested),
            ("http.request.method", "POST"),
            ("http.route", path),
            ("http.response.status_code", status),
            ("gateway.request_id", rid),
            ("gateway.model", model),
            ("gateway.stream", stream),
        ]
        body = req.body if req is not None else None
        if isinstance(body, dict):
            for field, name in _PARAMS:
                value = body.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attrs.append((name, value))
        if adapter:
            attrs.append(("gateway.adapter", adapter))
        key = ticket.tenant.key_id if ticket is not None else key_id(auth)
        if key:
            attrs.append(("gateway.key_id", key))
        if usage is not None:
            attrs.append(("gen_ai.usage.input_tokens", usage.prompt_tokens))
            attrs.append(("gen_ai.usage.output_tokens", usage.completion_tokens))
        if status == 200 and tails:
            attrs += _response_facts(tails, stream)
        if req is not None and req.worker:
            attrs.append(("gateway.worker", req.worker))
            attrs.append(("gateway.retries", req.retries))
        code, message = STATUS_UNSET, ""
        if error is not None:
            attrs.append(("error.type", error.type))
            if status >= 500:  # a server span's 4xx is the client's error, not the server's
                code, message = STATUS_ERROR, error.message
        elif status == 499:
            attrs.append(("error.type", "client_disconnected"))
        events: list[tuple[int, str]] = []
        if ttft is not None:
            attrs.append(("gen_ai.server.time_to_first_token", ttft))
            events.append((self._ns(start + ttft), "gen_ai.first_token"))
        parent = binascii.unhexlify(trace.parent_id) if trace.parent_id else b""
        end_ns = self._ns(end)
        spans: list[SpanData] = [
            (tid, server, parent, f"{operation} {requested}", SERVER, self._ns(start), end_ns,
             attrs, events, code, message, 0x301 if parent else 0x101)
        ]  # fmt: skip
        queued = trace.queued or end
        spans.append(self._child(tid, server, "gateway.admit", start, queued, []))
        if trace.queued:
            left = trace.admitted or end
            wait: Attributes = [("gateway.queue.wait_s", left - trace.queued)]
            spans.append(self._child(tid, server, "gateway.queue", trace.queued, left, wait))
        for i, attempt in enumerate(trace.attempts):
            spans.append(self._attempt(tid, server, attempt, i, path, end))
        return spans

    def _child(
        self, tid: bytes, parent: bytes, name: str, start: float, end: float, attrs: Attributes
    ) -> SpanData:
        span = (random.getrandbits(64) or 1).to_bytes(8, "big")
        return (tid, span, parent, name, INTERNAL, self._ns(start), self._ns(end), attrs, [],
                STATUS_UNSET, "", 0x101)  # fmt: skip

    def _attempt(
        self, tid: bytes, parent: bytes, a: Attempt, index: int, path: str, end: float
    ) -> SpanData:
        kind = "continuation" if a.continuation else ("first" if index == 0 else "retry")
        host, _, port = a.worker.partition("://")[2].rpartition(":")
        attrs: Attributes = [
            ("gateway.worker", a.worker),
            ("gateway.route.reason", a.reason),
            ("gateway.attempt", index),
            ("gateway.attempt.kind", kind),
            ("http.request.method", "POST"),
            ("url.full", a.worker + path),
            ("server.address", host or a.worker),
        ]
        if port.isdigit():
            attrs.append(("server.port", int(port)))
        code = STATUS_UNSET
        if a.error:
            attrs.append(("error.type", "attempt_failed"))
            code = STATUS_ERROR
        span = binascii.unhexlify(a.span_id)
        return (tid, span, parent, "upstream attempt", CLIENT, self._ns(a.start),
                self._ns(a.end or end), attrs, [], code, a.error, 0x101)  # fmt: skip


def _response_facts(tails: tuple[bytes | None, ...], stream: bool) -> Attributes:
    """Response model, id and finish reason from the answer's bytes: OpenAI's `id` and
    `model` come first in a whole body and in every chunk, the finish reason last."""
    out: Attributes = []
    reason = finish_reason(*tails)
    if reason is not None:
        out.append(("gen_ai.response.finish_reasons", (reason,)))
    model = rid = None
    for tail in tails:
        if tail:
            head = tail[:512] if not stream else tail
            model = model or _MODEL.search(head)
            rid = rid or _ID.search(head)
    if model is not None:
        out.append(("gen_ai.response.model", model[1].decode("utf-8", "replace")))
    if rid is not None:
        out.append(("gen_ai.response.id", rid[1].decode("utf-8", "replace")))
    return out


def make_tracer(settings: Settings) -> Tracer | None:
    """The process's tracer, or None when tracing is off."""
    url = traces_url(settings)
    return Tracer(settings, url) if url is not None else None


__all__ = ["RequestTrace", "Tracer", "make_tracer", "traces_url"]
