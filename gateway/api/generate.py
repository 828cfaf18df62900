"""`POST /v1/chat/completions` and `POST /v1/completions`: the hot path.

admit (`gateway.api.admit`: parse, screen, authenticate, limit, queue) → the engine
request → call the engine → answer whole, or relay the stream (`gateway.streaming`). Raw
ASGI handlers called by the front door in `gateway.app` (no framework middleware or
routing on this path: profiling showed it at a quarter of the gateway's CPU), one JSON
parse per request and none per chunk. The client going away cancels the engine call
(non-streamed) or the relay (streamed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from engines.base import Completed, EngineStream, GenerateRequest, ServingError
from gateway.api.admit import Call, RouteKind, admit, answer_json, engine_failure, server_timing
from gateway.api.requests import Receive, Scope, error_response
from gateway.media import check_hosts
from gateway.protocol import validate_chat, validate_completion
from gateway.streaming import DisconnectWatch, RelayResponse, Send

if TYPE_CHECKING:
    from gateway.served import Target
    from gateway.state import Gateway

# How long a request may run before a task starts watching for the client leaving.
WATCH_DELAY_S = 0.02

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _defaults(gw: Gateway, body: dict[str, Any], target: Target) -> None:
    """The model's request defaults from models.yaml, under what the client sent."""
    spec = target.spec
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


async def _screen_chat(gw: Gateway, call: Call) -> Any:
    body, target = call.body, call.target
    _defaults(gw, body, target)
    hosts: dict[str, str] = {}
    parsed = validate_chat(body, target.spec, gw.settings, hosts)
    if hosts:  # media URLs to listed hosts: their addresses must be public
        await check_hosts(hosts, target.spec.media)
    return parsed


async def _screen_completion(gw: Gateway, call: Call) -> Any:
    _defaults(gw, call.body, call.target)
    return validate_completion(call.body, call.target.spec, gw.settings)


CHAT = RouteKind("chat", "generate", _screen_chat, salted=True)
COMPLETIONS = RouteKind("completions", "generate", _screen_completion, salted=True)


async def chat_completions(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    await generate(gw, CHAT, scope, receive, send)


async def completions(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    await generate(gw, COMPLETIONS, scope, receive, send)


def engine_request(call: Call, route: Literal["chat", "completions"]) -> GenerateRequest:
    """The engine's request of an admitted generate call. A stream always asks the engine
    for its usage chunk; the relay drops it again when the client did not ask."""
    body, target = call.body, call.target
    if call.parsed.stream:
        opts = body.get("stream_options") or {}
        body["stream_options"] = {**opts, "include_usage": True}
    req = GenerateRequest(
        route=route,
        body=body,
        model=body["model"],
        adapter=target.adapter,
        request_id=call.rid,
        created=int(time.time()),
        trace=call.record.trace,
    )
    if call.parsed.stream and call.record.ticket is not None:
        req.tail = []  # a key's ledger counts a cut stream, what the worker sent after too
    routing = target.spec.routing
    if "session_affinity" in routing.scorers:
        req.session = call.inc.header(routing.session_header.lower().encode())
    call.record.req = req
    return req


class Answer:
    """What the engine gave an admitted call: a whole body (`done`), or a stream's first
    block and the rest (`first`, `agen`), with the request's disconnect watch handed over
    (a whole body's is closed already) and the time the engine took to it."""

    __slots__ = ("agen", "done", "first", "upstream_s", "watch")

    def __init__(
        self,
        done: Completed | None,
        first: bytes,
        agen: EngineStream | None,
        watch: DisconnectWatch,
        upstream_s: float,
    ):
        self.done = done
        self.first = first
        self.agen = agen
        self.watch = watch
        self.upstream_s = upstream_s


async def call_engine(
    call: Call,
    req: GenerateRequest,
    scope: Scope,
    receive: Receive,
    send: Send,
    rename: Callable[[ServingError], None] | None = None,
) -> Answer | None:
    """Call the engine for an admitted generate call: the whole body, or the stream's
    first block. None when the request is over already — the engine failed before its
    first byte (answered here with the error, after `rename` adjusts it for the route) or
    the client left — its record then finished."""
    record, engine = call.record, call.target.engine
    stream = record.stream
    watch = DisconnectWatch(receive, delay=WATCH_DELAY_S, send=send)
    upstream_start = time.perf_counter()
    agen: EngineStream | None = None
    done: Completed | None = None
    first = b""
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
            return None
        if not isinstance(exc, Exception):
            raise
        error = engine_failure(exc, call)
        if rename is not None:
            rename(error)
        record.finished(None, error, False)
        await error_response(error, call.rid)(scope, receive, send)
        return None
    finally:
        if not handed:
            watch.close()
    return Answer(done, first, agen, watch, upstream_s)


async def generate(
    gw: Gateway, kind: RouteKind, scope: Scope, receive: Receive, send: Send
) -> None:
    call = await admit(gw, kind, scope, receive, send)
    if call is None:
        return
    parsed, record = call.parsed, call.record
    stream = record.stream = bool(parsed.stream)
    want_usage = bool(stream and parsed.stream_options and parsed.stream_options.include_usage)
    req = engine_request(call, "chat" if kind is CHAT else "completions")
    answer = await call_engine(call, req, scope, receive, send)
    if answer is None:
        return
    upstream_s = answer.upstream_s
    done = answer.done
    if done is not None:
        record.tails = (done.body,)
        record.finished(done.usage, None, False)
        await answer_json(call, done.body, upstream_s)(scope, receive, send)
        return
    record.first_chunk(time.perf_counter())
    assert answer.agen is not None
    headers = [
        *SSE_HEADERS,
        (b"x-request-id", call.rid.encode()),
        (b"server-timing", server_timing(call, upstream_s)),
    ]
    if record.ticket is not None:
        headers += record.ticket.headers
    await RelayResponse(
        answer.first,
        answer.agen,
        want_usage=want_usage,
        headers=headers,
        observer=record,
        req=req,
        watch=answer.watch,
    )(scope, receive, send)
