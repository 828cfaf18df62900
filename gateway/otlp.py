"""OTLP/HTTP for the gateway's spans: the protobuf encoding, written by hand, and the sender.

Owns `encode_request` (an `ExportTraceServiceRequest` in OTLP's protobuf wire format,
`opentelemetry/proto/collector/trace/v1`, from plain `SpanData` tuples) and `OTLPSender`
(one POST of `application/x-protobuf` per batch on the gateway's event loop, gzip when
asked, at most one in flight; a failed export is dropped and counted, never retried
against a request). Does not decide what the spans are (`gateway.tracing`).

Why by hand rather than the SDK's `OTLPSpanExporter` and `BatchSpanProcessor`: measured on
this project's 2-core box (bench/tracing_cost.py, docs/benchmarks.md), the SDK's encoder
(`encode_spans`, building upb messages from Python) took about 100 µs of CPU per span —
400 µs for one request's four spans, plus about 80 µs to build its `ReadableSpan`s —
where this encoder writes the bytes directly (constant field tags and attribute keys
computed once). The wire format is checked by decoding with opentelemetry-proto in the
suite (`bench/otlp_receiver.py`). Protobuf rather than OTLP/JSON: every OTLP/HTTP receiver
takes protobuf, not all take JSON.

Encoding, per field: a tag byte (field number << 3 | wire type), then a varint, a
fixed64 or a length-delimited payload. Only what the gateway's spans use is written:
ids, name, kind, times, attributes (string, bool, int, double, string arrays), events,
status and flags.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import struct
import time
from typing import Any

import aiohttp

log = logging.getLogger("gateway.tracing")

# Span kinds (`opentelemetry.proto.trace.v1.Span.SpanKind`) and status codes.
INTERNAL, SERVER, CLIENT = 1, 2, 3
STATUS_UNSET, STATUS_ERROR = 0, 2

# (name, value) pairs; value: str, bool, int, float or a tuple of str (hashable: the
# encoded pairs are cached).
Attributes = list[tuple[str, Any]]
# (trace_id 16 bytes, span_id 8 bytes, parent span id 8 bytes or b"", name, kind, start
#  and end in Unix ns, attributes, events as (time ns, name), status code, its message,
#  flags: W3C trace flags | 0x100 "parent remoteness known" | 0x200 "parent is remote").
SpanData = tuple[
    bytes, bytes, bytes, str, int, int, int, Attributes, list[tuple[int, str]], int, str, int
]

_VARINT1 = [bytes((i,)) for i in range(128)]
_Q = struct.Struct("<Q")
_D = struct.Struct("<d")
_I = struct.Struct("<I")
_KEYS: dict[str, bytes] = {}
# Encoded span attributes (`_span_attributes`).
_CACHE: dict[tuple[str, Any], bytes] = {}
_CACHE_MAX = 16384


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _VARINT1[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


def _text(tag: bytes, s: str) -> bytes:
    return _len(tag, s.encode("utf-8", "replace"))


def _any(value: Any) -> bytes:
    """An `AnyValue`."""
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _D.pack(value)
    if isinstance(value, (list, tuple)):
        return _len(b"\x2a", b"".join(_len(b"\x0a", _any(v)) for v in value))
    return _text(b"\x0a", str(value))


def _key(name: str) -> bytes:
    """A `KeyValue.key` field (the gateway uses a few dozen names: computed once each)."""
    k = _KEYS.get(name)
    if k is None:
        k = _KEYS[name] = _text(b"\x0a", name)
    return k


def _attribute(tag: bytes, k: str, v: Any) -> bytes:
    return _len(tag, _key(k) + _len(b"\x12", _any(v)))


def _span_attributes(attrs: Attributes) -> bytes:
    """A span's repeated `KeyValue`s. Most (name, value) pairs recur from request to request (the
    operation, models, workers, routing reasons, statuses, token counts): their bytes are
    kept (up to `_CACHE_MAX`), so a span's attributes are mostly dict look-ups."""
    cache = _CACHE
    out = []
    for kv in attrs:
        b = cache.get(kv)
        if b is None:
            b = _attribute(b"\x4a", *kv)
            v = kv[1]
            if type(v) is str or type(v) is int:  # floats and ids rarely recur
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[kv] = b
        out.append(b)
    return b"".join(out)


def encode_span(s: SpanData) -> bytes:
    """One `Span` message."""
    trace_id, span_id, parent, name, kind, start, end, attrs, events, code, message, flags = s
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if parent:
        parts += (b"\x22\x08", parent)
    parts += (
        _text(b"\x2a", name),
        b"\x30",
        _VARINT1[kind],
        b"\x39",
        _Q.pack(start),
        b"\x41",
        _Q.pack(end),
        _span_attributes(attrs),
    )
    for at, event in events:
        parts.append(_len(b"\x5a", b"\x09" + _Q.pack(at) + _text(b"\x12", event)))
    if code or message:
        status = (_text(b"\x12", message) if message else b"") + b"\x18" + _VARINT1[code]
        parts.append(_len(b"\x7a", status))
    parts += (b"\x85\x01", _I.pack(flags))
    return b"".join(parts)


def encode_request(resource: Attributes, scope: str, spans: list[bytes]) -> bytes:
    """An `ExportTraceServiceRequest` of encoded spans, one resource and one scope."""
    scope_spans = _len(b"\x0a", _text(b"\x0a", scope)) + b"".join(_len(b"\x12", s) for s in spans)
    attrs = b"".join(_attribute(b"\x0a", k, v) for k, v in resource)
    resource_spans = _len(b"\x0a", attrs) + _len(b"\x12", scope_spans)
    return _len(b"\x0a", resource_spans)


def parse_headers(value: str) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS: `key=value` pairs, comma-separated, values URL-encoded."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for pair in value.split(","):
        key, eq, val = pair.partition("=")
        if eq and key.strip():
            out[key.strip()] = unquote(val.strip())
    return out


class OTLPSender:
    """POSTs encoded export requests to one OTLP/HTTP traces URL, one at a time."""

    def __init__(
        self, url: str, headers: dict[str, str], timeout_s: float, compression: str
    ) -> None:
        self.url = url
        self.headers = {**headers, "Content-Type": "application/x-protobuf"}
        self.gzip = compression == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # export requests the receiver accepted
        self.failed = 0
        self._warned = 0.0

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def send(self, body: bytes) -> None:
        """Start one export (the caller checks `busy` first)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        self._task = asyncio.get_running_loop().create_task(self._post(body))

    async def _post(self, body: bytes) -> None:
        assert self._session is not None
        if self.gzip:
            body = gzip.compress(body, 5)
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as r:
                await r.read()
                if r.status // 100 == 2:
                    self.sent += 1
                    return
                why = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            why = f"{type(e).__name__}: {e}"
        self.failed += 1
        now = time.monotonic()
        if now - self._warned > 60:  # one line a minute at most
            self._warned = now
            log.warning("trace export to %s failed (%s); those spans are dropped", self.url, why)

    async def close(self) -> None:
        """Wait for the export in flight (bounded by its timeout), then close."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = [
    "CLIENT",
    "INTERNAL",
    "SERVER",
    "STATUS_ERROR",
    "STATUS_UNSET",
    "OTLPSender",
    "SpanData",
    "encode_request",
    "encode_span",
    "parse_headers",
]
