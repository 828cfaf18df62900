"""The one pass every hot route takes before its own work, and how it hands the engine's
answer back: parse, screen, authenticate, limit, queue — then call the engine and answer.

Owns `RouteKind` (what differs between the hot routes: which model task they serve and how
a body is screened) and `admit()`, which runs the steps once, in this order:

1. name the request (X-Request-Id) and open its `RequestRecord` — the one record the
   metrics, Server-Timing, the access log and the engine request all read;
2. authenticate the key (`gateway.api.auth`);
3. parse the bounded JSON body (`read_json`) and resolve its model (`served.py`);
4. screen it for the route (`RouteKind.screen`: task, per-model defaults, field
   allowlist, list/map bounds, media policy, typed parse);
5. limit: one atomic admission for the key (`Tenancy.admit`: RPM/TPM/parallel/budget);
6. queue: the model's bounded admission queue (`gateway.admission`), for every route,
   embeddings included.

A failure at any step is answered once, here, with the OpenAI envelope and the record
finished. Also owns `engine_failure` (what an engine's exception becomes for the client)
and `answer_json` (a whole JSON answer with the headers every hot answer carries). Does not
own what a route does with an admitted call (`generate`, `embeddings`), nor the steps'
rules (each lives in the module named above).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.base import ServingError
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
from gateway.redact import public_error
from gateway.streaming import Send

if TYPE_CHECKING:
    from gateway.limits import Tenant
    from gateway.served import Target
    from gateway.state import Gateway

log = logging.getLogger("gateway.api")

# Screen a body for one route: (gateway, the call so far: body, target, tenant) → the
# parsed request. May rewrite `call.body` in place (defaults, dropped fields; a Responses
# request becomes its chat body) and may await (media host checks, stored responses).
Screen = Callable[["Gateway", "Call"], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class RouteKind:
    """What one hot route family is, for the pass: its label in the metrics and the access
    log, the model task it serves, and its screen."""

    name: str
    task: str  # a ModelSpec.task: "generate" or "embed"
    screen: Screen
    # Generate routes put the key's cache salt into the body (tenants never share
    # prefix-cache entries); embeddings have no prefix cache.
    salted: bool = False


class Call:
    """An admitted request: everything the route needs for its own work."""

    __slots__ = ("body", "inc", "parsed", "record", "rid", "start", "target", "tenant")

    def __init__(
        self,
        record: RequestRecord,
        inc: Incoming,
        body: dict[str, Any],
        parsed: Any,
        target: Target,
        tenant: Tenant | None,
    ):
        self.record = record
        self.rid = record.rid
        self.start = record.start
        self.inc = inc
        self.body = body
        self.parsed = parsed
        self.target = target
        self.tenant = tenant


_WRONG_TASK = {
    "generate": "The model `{}` serves embeddings only.",
    "embed": "The model `{}` does not serve embeddings.",
}


async def admit(
    gw: Gateway, kind: RouteKind, scope: Scope, receive: Receive, send: Send
) -> Call | None:
    """Run the pass; the admitted call, or None when the request was answered already (an
    error) — its record is then finished."""
    record = RequestRecord(gw, kind.name, time.perf_counter())
    inc = Incoming(scope, receive)
    rid = request_id(inc, gw.request_ids)
    record.identify(inc, rid)
    try:
        tenant = await check_client_key(gw, inc)
        body = await read_json(inc, gw.settings.max_body_bytes)
        target = gw.served.resolve(body.get("model"))
        spec = target.spec
        record.model = spec.name
        if spec.task != kind.task:
            raise InvalidRequest(_WRONG_TASK[kind.task].format(spec.name), param="model")
        call = Call(record, inc, body, None, target, tenant)
        call.parsed = await kind.screen(gw, call)
        if tenant is not None:
            record.ticket = await gw.tenancy.admit(tenant, spec.name, body)
        if kind.salted:
            apply_cache_salt(body, target.engine, tenant.record.cache_salt if tenant else None)
        record.begin()
        gate = gw.admission.gates.get(spec.name)
        if gate is not None:
            try:
                await gate.enter()
            except asyncio.CancelledError:
                record.finished(None, None, True)
                raise
            record.release = gate.leave
    except ServingError as exc:
        record.finished(None, exc, False)
        await error_response(exc, rid)(scope, receive, send)
        return None
    if record.trace is not None:
        record.trace.admitted = time.perf_counter()
    record.adapter = target.adapter
    record.engine = target.engine
    return call


def engine_failure(exc: Exception, call: Call) -> ServingError:
    """What an engine's exception becomes for the client: a ServingError with nothing
    internal in it (`gateway.redact`); any other exception is an engine bug, logged, and
    still a 500 in the envelope."""
    name = call.target.spec.name
    if not isinstance(exc, ServingError):
        log.exception("engine %s failed", name, exc_info=exc)
        exc = ServingError("The engine failed while processing the request.")
    return public_error(exc, name, call.rid)


def server_timing(call: Call, upstream_s: float) -> bytes:
    """The Server-Timing value: the gateway's own time and the engine's, up to now."""
    gateway_s = time.perf_counter() - call.start - upstream_s
    return b"gateway;dur=%.3f, upstream;dur=%.3f" % (gateway_s * 1000, upstream_s * 1000)


def answer_json(call: Call, body: bytes, upstream_s: float) -> RawResponse:
    """A whole JSON answer with what every hot answer carries: the request id,
    Server-Timing, and the key's x-ratelimit-* headers."""
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", call.rid.encode()),
        (b"server-timing", server_timing(call, upstream_s)),
    ]
    ticket = call.record.ticket
    if ticket is not None:
        headers += ticket.headers
    return RawResponse(200, body, headers)


__all__ = ["Call", "RouteKind", "admit", "answer_json", "engine_failure", "server_timing"]
