"""What every API route does before and after its own work: read a bounded JSON body, name
the request, account for it in the metrics, and send a finished response.

Works on the raw ASGI scope and `receive` channel (`Incoming`), not Starlette's Request:
the generate routes are the hot path and skip the framework entirely (`gateway.app`'s
front door); the cold routes wrap their Request the same way. Authentication is
`gateway.api.auth`; rendering an error is `gateway.errors`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from engines.base import Engine, GenerateRequest, ServingError, Usage
from gateway.direct_body import whole_response
from gateway.errors import InvalidRequest, PayloadTooLarge, error_body, error_headers
from gateway.metrics import RouteMetrics, observe_many
from gateway.streaming import StreamObserver
from gateway.usage_count import exact_usage

if TYPE_CHECKING:
    from gateway.ids import RequestIds
    from gateway.limits import Ticket
    from gateway.state import Gateway
    from gateway.tracing import RequestTrace

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Scope = MutableMapping[str, Any]


class Incoming:
    """The parts of a request the routes read: headers (lower-case bytes) and the body."""

    __slots__ = ("headers", "receive")

    def __init__(self, scope: MutableMapping[str, Any], receive: Receive):
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.receive = receive

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None


def request_id(inc: Incoming, ids: RequestIds) -> str:
    """The client's X-Request-Id when it is sane, else a fresh one."""
    rid = inc.header(b"x-request-id")
    if rid and len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    return ids.next()


async def read_json(inc: Incoming, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `limit` bytes (checked as it arrives, so a
    chunked body cannot grow past it either), 400 if it is not a JSON object."""
    length = inc.headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The request body is {int(length)} bytes; at most {limit} allowed.")
    message = await inc.receive()
    body = message.get("body", b"")
    if message.get("more_body"):
        parts, size = [body], len(body)
        while message.get("more_body"):
            message = await inc.receive()
            if message["type"] == "http.disconnect":
                break
            part = message.get("body", b"")
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            parts.append(part)
        body = b"".join(parts)
    if len(body) > limit:
        raise PayloadTooLarge(f"The request body is {len(body)} bytes; at most {limit} allowed.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"The body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    return data


class RequestRecord(StreamObserver):
    """One request's account in the metrics and the access log; also the stream observer
    of its relay."""

    __slots__ = (
        "_began",
        "_done",
        "_m",
        "adapter",
        "auth",
        "blocks",
        "engine",
        "gw",
        "model",
        "release",
        "req",
        "rid",
        "route",
        "sent",
        "start",
        "stream",
        "tails",
        "ticket",
        "trace",
        "ttft",
    )

    def __init__(self, gw: Gateway, route: str, start: float):
        self.ticket: Ticket | None = None  # an API key's admission, settled in finished()
        self.blocks = 0
        # The engine that served it (for an exact count of a cut stream) and what the
        # relay sent, kept only when the stream ended without usage.
        self.engine: Engine | None = None
        self.sent: list[bytes] | None = None
        self.gw = gw
        self.route = route
        self.model = "_unknown"
        self.start = start
        self._done = False
        self._began = False
        self._m: RouteMetrics | None = None
        # Frees the request's admission slot (`gateway.admission`) when it ends.
        self.release: Callable[[], None] | None = None
        # For the access log (`gateway.access_log`): set by the route as it learns them.
        self.rid = ""
        self.auth: bytes | None = None
        self.adapter: str | None = None
        self.stream = False
        self.ttft: float | None = None
        self.tails: tuple[bytes | None, ...] = ()
        # The request handed to the engine (it notes the worker and retries there).
        self.req: GenerateRequest | None = None
        # Its trace when tracing is on (`gateway.tracing`; also the engine's TraceContext).
        self.trace: RequestTrace | None = None

    def identify(self, inc: Incoming, rid: str) -> None:
        self.rid = rid
        self.auth = inc.headers.get(b"authorization")
        tracer = self.gw.tracer
        if tracer is not None:
            self.trace = tracer.begin(inc.headers.get(b"traceparent"))

    def begin(self) -> None:
        """The request passed validation and goes to the engine."""
        if self.trace is not None:
            self.trace.queued = time.perf_counter()
        self._began = True
        self._m = self.gw.metrics.route(self.model, self.route)
        self._m.in_flight.inc()

    def streamed(self, blocks: list[bytes] | None) -> None:
        self.sent = blocks

    def relayed(self, events: int) -> None:
        self.blocks = events

    def paths(self, direct: int, loop: int) -> None:
        if self._m is not None:
            if direct:
                self._m.direct_blocks.inc(direct)
            self._m.loop_blocks.inc(loop)

    def first_chunk(self, at: float) -> None:
        self.ttft = at - self.start
        if self._m is not None:
            self._m.ttft.observe(self.ttft)

    def gaps(self, gaps: list[float]) -> None:
        if self._m is not None:
            observe_many(self._m.itl, gaps)

    def tail(self, blocks: tuple[bytes | None, ...]) -> None:
        self.tails = blocks

    def finished(self, usage: Usage | None, error: ServingError | None, disconnected: bool) -> None:
        if self._done:
            return
        self._done = True
        if self.release is not None:
            self.release()
            self.release = None
        if self.ticket is not None:
            count = None
            sent = self.sent
            req = self.req
            if usage is None and req is not None and req.tail and (sent or self.ttft is None):
                # The events the worker sent after the client left (`GenerateRequest.tail`):
                # the worker generated them for this request, and its counters have them.
                sent = [*(sent or ()), *req.tail]
            if usage is None and sent and self.engine is not None and req is not None:
                # A cut stream: counted by the model's tokenizer in the settlement's task.
                count = partial(exact_usage, self.engine, req.body, self.route == "chat", sent)
            self.gw.tenancy.settle_soon(
                self.ticket, usage, error, disconnected, self.blocks, count, sent
            )
        rm = self._m or self.gw.metrics.route(self.model, self.route)
        if self._began:
            rm.in_flight.dec()
        duration = time.perf_counter() - self.start
        rm.duration.observe(duration)
        if usage is not None:
            rm.prompt_tokens.inc(usage.prompt_tokens)
            rm.completion_tokens.inc(usage.completion_tokens)
        if not disconnected and error is None:
            rm.ok.inc()
            status = 200
        else:
            m = self.gw.metrics
            if disconnected:
                m.client_disconnects.labels(self.model).inc()
                status = 499  # nginx's "client closed request"
            else:
                assert error is not None
                status = error.status
                m.errors.labels(self.model, self.route, error.type).inc()
                if status == 429:
                    m.rate_limited.labels(self.model).inc()
            m.requests.labels(self.model, self.route, f"{status // 100}xx").inc()
        log = self.gw.access_log
        if log.wanted(status != 200):
            req = self.req
            worker = req.worker if req is not None else None
            log.emit((
                time.time(), self.rid, None if self.model == "_unknown" else self.model,
                self.adapter, self.auth, self.route, self.stream, status,
                usage.prompt_tokens if usage is not None else None,
                usage.completion_tokens if usage is not None else None,
                self.ttft, time.perf_counter() - self.start,
                error.type if error is not None else None, self.tails, worker,
                req.retries if req is not None and worker is not None else None,
            ))  # fmt: skip
        if self.trace is not None:
            tracer = self.gw.tracer
            assert tracer is not None
            tracer.end(self, status, usage, error)
        self.gw.series.record(self.model, status, duration, self.ttft, usage)


def error_response(exc: ServingError, rid: str) -> RawResponse:
    return RawResponse(
        exc.status, error_body(exc), [*error_headers(exc), (b"x-request-id", rid.encode())]
    )


class RawResponse:
    """A finished response as two ASGI messages: no header normalisation on the hot path."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
        self.status = status
        self.body = body
        self.headers = headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if whole_response(send, self.status, self.headers, self.body):
            return
        headers = [*self.headers, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
