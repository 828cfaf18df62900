"""`/v1/responses`: create (hot), retrieve, delete and list input items (cold).

`POST /v1/responses` takes the one admission pass (`gateway.api.admit`) as route "responses":
its screen parses the Responses request, reads the chain before it from the store
(`previous_response_id`, only among the calling key's own records), builds the chat body
(`gateway.responses.translate`) and screens that exactly as a chat request (defaults,
allowlist, bounds, media policy), so limits, budgets, the ledger, metrics and the access
log see a chat request's tokens. The engine is called as chat is (`generate.call_engine`);
a whole answer becomes a Response object, a stream becomes the Responses event sequence
(`gateway.responses.events`). With `store` (the default) the finished Response and its
context are written before the client sees the end, so the next turn may chain on it
through any front door. Errors name the Responses field (`rename_param`).

The cold routes read and delete records of the calling key only: another key's id, or an
evicted or expired one, is a 404. Does not own translation, events or storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from engines.base import ServingError, Usage
from gateway.allowlist import screen_fields
from gateway.api.admit import Call, RouteKind, admit, answer_json, engine_failure, server_timing
from gateway.api.auth import check_client_key
from gateway.api.generate import CHAT, SSE_HEADERS, call_engine, engine_request
from gateway.api.requests import Incoming, Receive, Scope
from gateway.errors import InvalidRequest, NotFound
from gateway.responses.events import EventStream
from gateway.responses.protocol import ResponsesRequest
from gateway.responses.store import owner_of
from gateway.responses.translate import (
    Turn,
    build_turn,
    history_of,
    output_of,
    record_bytes,
    rename_param,
    response_object,
    usage_of,
)
from gateway.streaming import Send

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.api")

__all__ = ["RESPONSES", "create", "delete", "input_items", "retrieve"]


def _parse(body: dict[str, Any]) -> ResponsesRequest:
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "list")))
        if err["type"] == "missing":
            msg = f"Missing required parameter: '{param}'."
        else:
            msg = f"Invalid value for '{param}': {err['msg']}."
        raise InvalidRequest(msg, param=param, code="invalid_value") from None


async def _screen(gw: Gateway, call: Call) -> Turn:
    body = call.body
    screen_fields(body, "responses", call.target.spec.request_fields)
    req = _parse(body)
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        owner = owner_of(call.tenant, call.inc.headers.get(b"authorization"))
        raw = await gw.responses.get(owner, req.previous_response_id)
        if raw is None:
            raise NotFound(
                f"Previous response with id '{req.previous_response_id}' not found.",
                param="previous_response_id",
            )
        history = history_of(orjson.loads(raw))
    turn = build_turn(req, body, history)
    body.clear()
    body.update(turn.chat)
    try:
        await CHAT.screen(gw, call)  # the chat body meets every check a chat request does
    except ServingError as e:
        e.param = rename_param(turn, e.param)
        raise
    return turn


RESPONSES = RouteKind("responses", "generate", _screen, salted=True)


async def _store(gw: Gateway, call: Call, turn: Turn, response: bytes) -> None:
    """Keep a finished response for chaining and retrieval (`store`, on by default). A
    store that does not answer costs the client its chain, not this answer: logged."""
    if turn.req.store is False:
        return
    owner = owner_of(call.tenant, call.inc.headers.get(b"authorization"))
    try:
        await gw.responses.put(owner, turn.id, record_bytes(turn, response))
    except ServingError as e:
        log.warning("request %s: response %s not stored: %s", call.rid, turn.id, e.message)


def _usage(chat_usage: dict[str, Any] | None) -> Usage | None:
    if not isinstance(chat_usage, dict):
        return None
    return Usage(
        int(chat_usage.get("prompt_tokens") or 0), int(chat_usage.get("completion_tokens") or 0)
    )


async def create(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    call = await admit(gw, RESPONSES, scope, receive, send)
    if call is None:
        return
    turn: Turn = call.parsed
    record = call.record
    record.stream = bool(turn.req.stream)
    req = engine_request(call, "chat")

    def rename(error: ServingError) -> None:
        error.param = rename_param(turn, error.param)

    answer = await call_engine(call, req, scope, receive, send, rename)
    if answer is None:
        return
    if answer.done is not None:
        done = answer.done
        chat = orjson.loads(done.body)
        output, finish = output_of(chat)
        response = response_object(
            turn,
            status="incomplete" if finish == "length" else "completed",
            output=output,
            usage=usage_of(chat.get("usage")),
            finish=finish,
        )
        body = orjson.dumps(response)
        await _store(gw, call, turn, body)
        record.tails = (done.body,)
        record.finished(done.usage, None, False)
        await answer_json(call, body, answer.upstream_s)(scope, receive, send)
        return
    assert answer.agen is not None
    record.first_chunk(time.perf_counter())
    headers = [
        *SSE_HEADERS,
        (b"x-request-id", call.rid.encode()),
        (b"server-timing", server_timing(call, answer.upstream_s)),
    ]
    if record.ticket is not None:
        headers += record.ticket.headers
    events = EventStream(turn)
    watch, agen = answer.watch, answer.agen
    watch.now()
    error: ServingError | None = None
    gaps: list[float] = []
    blocks = 1
    tail: tuple[bytes | None, ...] = (answer.first,)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        out = events.start() + events.feed(answer.first)
        await send({"type": "http.response.body", "body": out, "more_body": True})
        last = time.perf_counter()
        async for block in agen:
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            blocks += 1
            tail = (block, tail[0])
            out = events.feed(block)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        final = events.finish_events()
        assert events.response is not None
        await _store(gw, call, turn, orjson.dumps(events.response))
        await send({"type": "http.response.body", "body": final, "more_body": False})
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
    except Exception as exc:  # after the first event: `error` + `response.failed`
        error = engine_failure(exc, call)
        error.param = rename_param(turn, error.param)
        failed = events.failed_events(error)
        if events.response is not None:
            await _store(gw, call, turn, orjson.dumps(events.response))
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": failed, "more_body": False})
    finally:
        watch.close()
        await agen.aclose()
        if gaps:
            record.gaps(gaps)
        usage = _usage(events.chat_usage)
        if usage is None:
            record.relayed(blocks)
        record.tail(tail)
        record.finished(usage, error, watch.disconnected)


# -- the cold routes ------------------------------------------------------------------------


async def _record_of(request: Request) -> tuple[Gateway, str, str, dict[str, Any]]:
    """(gateway, owner, id, the stored record) of the caller's own response; 404 else."""
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    tenant = await check_client_key(gw, inc)
    owner = owner_of(tenant, inc.headers.get(b"authorization"))
    rid = request.path_params["response_id"]
    raw = await gw.responses.get(owner, rid)
    if raw is None:
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id")
    record: dict[str, Any] = orjson.loads(raw)
    return gw, owner, rid, record


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


async def retrieve(request: Request) -> Response:
    _, _, _, record = await _record_of(request)
    return _json(record["response"])


async def delete(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    tenant = await check_client_key(gw, inc)
    owner = owner_of(tenant, inc.headers.get(b"authorization"))
    rid = request.path_params["response_id"]
    if not await gw.responses.delete(owner, rid):
        raise NotFound(f"Response with id '{rid}' not found.", param="response_id")
    return _json({"id": rid, "object": "response.deleted", "deleted": True})


def _limit(raw: str | None) -> int:
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidRequest(
            "Invalid value for 'limit': expected an integer from 1 to 100.", param="limit"
        )
    return int(raw)


async def input_items(request: Request) -> Response:
    """The items the model saw before this response's output (the chain's, then the
    request's input), newest first unless `order=asc`; `after` and `limit` page."""
    _, _, _, record = await _record_of(request)
    q = request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': expected asc or desc.", param="order")
    limit = _limit(q.get("limit"))
    items: list[dict[str, Any]] = list(record["context"])
    if order == "desc":
        items.reverse()
    after = q.get("after")
    if after:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise NotFound(f"Item with id '{after}' not found.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return _json(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
