"""`POST /v1/chat/completions` and `POST /v1/completions`: the hot path.

Validate → resolve the model → hand a `GenerateRequest` to the engine → answer with the
engine's bytes (whole, or relayed as SSE). Raw ASGI handlers called by the front door in
`gateway.app` (no framework middleware or routing on this path: profiling showed it at a
quarter of the gateway's CPU), one JSON parse per request and none per chunk. The client
going away cancels the engine call (non-streamed) or the relay (streamed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from engines.base import EngineStream, GenerateRequest, ServingError
from gateway.allowlist import apply_cache_salt
from gateway.api.auth import check_client_key
from gateway.api.requests import (
    Incoming,
    RawResponse,
    Receive,
    RequestRecord,
    Scope,
    error_response,
    read_json,
    request_id,
)
from gateway.errors import InvalidRequest
from gateway.media import check_hosts
from gateway.protocol import validate_chat, validate_completion
from gateway.redact import public_error
from gateway.streaming import DisconnectWatch, RelayResponse, Send

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.generate")

Route = Literal["chat", "completions"]

# How long a request may run before a task starts watching for the client leaving.
WATCH_DELAY_S = 0.02

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _timing(gateway_s: float, upstream_s: float) -> bytes:
    return (f"gateway;dur={gateway_s * 1000:.3f}, upstream;dur={upstream_s * 1000:.3f}").encode()


async def chat_completions(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    await _generate(gw, "chat", scope, receive, send)


async def completions(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    await _generate(gw, "completions", scope, receive, send)


async def _generate(gw: Gateway, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
    start = time.perf_counter()
    record = RequestRecord(gw, route, start)
    inc = Incoming(scope, receive)
    rid = request_id(inc, gw.request_ids)
    record.identify(inc, rid)
    try:
        tenant = await check_client_key(gw, inc)
        body = await read_json(inc, gw.settings.max_body_bytes)
        target = gw.served.resolve(body.get("model"))
        spec = target.spec
        record.model = spec.name
        if spec.task != "generate":
            raise InvalidRequest(f"The model `{spec.name}` serves embeddings only.", param="model")
        defaults = gw.served.request_defaults(spec.name)
        if defaults:
            for key, value in defaults.items():
                body.setdefault(key, value)
        if (
            "max_tokens_default" in spec.model_fields_set
            and body.get("max_tokens") is None
            and body.get("max_completion_tokens") is None
        ):
            # Set in models.yaml: the gateway applies it for every engine alike.
            body["max_tokens"] = spec.max_tokens_default
        if route == "chat":
            hosts: dict[str, str] = {}
            parsed: Any = validate_chat(body, spec, gw.settings, hosts)
            if hosts:  # media URLs to listed hosts: their addresses must be public
                await check_hosts(hosts, spec.media)
        else:
            parsed = validate_completion(body, spec, gw.settings)
        if tenant is not None:
            record.ticket = await gw.tenancy.admit(tenant, spec.name, body)
        # The key's own secret: tenants never share prefix-cache entries.
        apply_cache_salt(body, spec, tenant=tenant.record.cache_salt if tenant else None)
        record.begin()
        gate = gw.admission.gates.get(spec.name)
        if gate is not None:
            try:
                await gate.enter()
            except asyncio.CancelledError:
                record.finished(None, None, True)
                raise
            record.release = gate.leave
        stream = record.stream = parsed.stream
        record.adapter = target.adapter
        want_usage = bool(stream and parsed.stream_options and parsed.stream_options.include_usage)
        if stream:
            # Engines always report usage at the end; the relay drops it again if unasked.
            opts = body.get("stream_options") or {}
            body["stream_options"] = {**opts, "include_usage": True}
        req = GenerateRequest(
            route=route,
            body=body,
            model=body["model"],
            adapter=target.adapter,
            request_id=rid,
            created=int(time.time()),
        )
        if "session_affinity" in spec.routing.scorers:
            req.session = inc.header(spec.routing.session_header.lower().encode())
        record.req = req
    except ServingError as exc:
        record.finished(None, exc, False)
        await error_response(exc, rid)(scope, receive, send)
        return

    engine = target.engine
    watch = DisconnectWatch(receive, delay=WATCH_DELAY_S, send=send)
    upstream_start = time.perf_counter()
    agen: EngineStream | None = None
    handed = False  # a stream's relay takes the watch over (one per request)
    try:
        if not stream:
            done = await engine.complete(req)
        else:
            agen = engine.stream(req)
            try:
                first = await agen.__anext__()
            except StopAsyncIteration:
                first = b""
        upstream_s = time.perf_counter() - upstream_start
        handed = stream
    except BaseException as exc:
        if agen is not None:  # failed before its first block: close it now, not at GC
            await agen.aclose()
        if isinstance(exc, asyncio.CancelledError):
            if not watch.absorb():
                raise
            record.finished(None, None, True)
            return
        if not isinstance(exc, Exception):
            raise
        if not isinstance(exc, ServingError):  # an engine bug: still a 500 in the envelope
            log.exception("engine %s failed", target.spec.name, exc_info=exc)
            exc = ServingError("The engine failed while processing the request.")
        exc = public_error(exc, target.spec.name, rid)
        record.finished(None, exc, False)
        await error_response(exc, rid)(scope, receive, send)
        return
    finally:
        if not handed:
            watch.close()

    now = time.perf_counter()
    timing = _timing(now - start - upstream_s, upstream_s)
    if not stream:
        record.tails = (done.body,)
        record.finished(done.usage, None, False)
        await RawResponse(
            200,
            done.body,
            [
                (b"content-type", b"application/json"),
                (b"x-request-id", rid.encode()),
                (b"server-timing", timing),
                *(record.ticket.headers if record.ticket is not None else ()),
            ],
        )(scope, receive, send)
        return
    record.first_chunk(now)
    assert agen is not None
    headers = [*_SSE_HEADERS, (b"x-request-id", rid.encode()), (b"server-timing", timing)]
    if record.ticket is not None:
        headers += record.ticket.headers
    await RelayResponse(
        first, agen, want_usage=want_usage, headers=headers, observer=record, req=req, watch=watch
    )(scope, receive, send)
