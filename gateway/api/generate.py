"""`POST /v1/chat/completions` and `POST /v1/completions`: the hot path.

Validate → resolve the model → hand a `GenerateRequest` to the engine → answer with the
engine's bytes (whole, or relayed as SSE). Plain Starlette endpoints, no dependency
injection, one JSON parse per request and none per chunk. The client going away cancels
the engine call (non-streamed) or the relay (streamed).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from engines.base import GenerateRequest, ServingError
from gateway.api.common import RequestRecord, check_client_key, read_json, request_id
from gateway.errors import InvalidRequest, error_body, error_headers
from gateway.protocol import validate_chat, validate_completion
from gateway.streaming import DisconnectWatch, RelayResponse

if TYPE_CHECKING:
    from gateway.app import Gateway

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _timing(gateway_s: float, upstream_s: float) -> bytes:
    return (f"gateway;dur={gateway_s * 1000:.3f}, "
            f"upstream;dur={upstream_s * 1000:.3f}").encode()


async def chat_completions(request: Request) -> Any:
    return await _generate(request, "chat")


async def completions(request: Request) -> Any:
    return await _generate(request, "completions")


async def _generate(request: Request, route: str) -> Any:
    start = time.perf_counter()
    gw: Gateway = request.app.state.gateway
    record = RequestRecord(gw, route, start)
    rid = request_id(request)
    try:
        check_client_key(gw, request)
        body = await read_json(request, gw.settings.max_body_bytes)
        target = gw.served.resolve(body.get("model"))
        record.model = target.spec.name
        spec = target.spec
        if spec.task != "generate":
            raise InvalidRequest(f"The model `{spec.name}` serves embeddings only.",
                                 param="model")
        if route == "chat":
            parsed: Any = validate_chat(body, spec.max_model_len, gw.settings)
        else:
            parsed = validate_completion(body, spec.max_model_len, gw.settings)
        record.begin()
        stream = parsed.stream
        want_usage = bool(stream and parsed.stream_options and parsed.stream_options.include_usage)
        if stream:
            # Engines always report usage at the end; the relay drops it again if unasked.
            opts = body.get("stream_options") or {}
            body["stream_options"] = {**opts, "include_usage": True}
        req = GenerateRequest(route=route,  # type: ignore[arg-type]
                              body=body, model=body["model"], adapter=target.adapter,
                              request_id=rid, created=int(time.time()))
    except ServingError as exc:
        record.finished(None, exc, False)
        return _error(exc, rid)

    engine = target.engine
    watch = DisconnectWatch(request.receive)
    upstream_start = time.perf_counter()
    try:
        if not stream:
            done = await engine.complete(req)
            upstream_s = time.perf_counter() - upstream_start
        else:
            agen = engine.stream(req)
            try:
                first = await agen.__anext__()
            except StopAsyncIteration:
                first = b""
            upstream_s = time.perf_counter() - upstream_start
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        record.finished(None, None, True)
        return Response(status_code=499)
    except ServingError as exc:
        record.finished(None, exc, False)
        return _error(exc, rid)
    finally:
        watch.close()

    now = time.perf_counter()
    timing = _timing(now - start - upstream_s, upstream_s)
    if not stream:
        record.finished(done.usage, None, False)
        return _Raw(200, done.body, [(b"content-type", b"application/json"),
                                     (b"x-request-id", rid.encode()),
                                     (b"server-timing", timing)])
    record.first_chunk(now)
    headers = [*_SSE_HEADERS, (b"x-request-id", rid.encode()), (b"server-timing", timing)]
    return RelayResponse(first, agen, want_usage=want_usage, headers=headers, observer=record)


def _error(exc: ServingError, rid: str) -> _Raw:
    return _Raw(exc.status, error_body(exc), [*error_headers(exc), (b"x-request-id", rid.encode())])


class _Raw:
    """A finished response as two ASGI messages: no header normalisation on the hot path."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
        self.status = status
        self.body = body
        self.headers = headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [*self.headers, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
