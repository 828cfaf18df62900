"""`POST /v1/embeddings`: the same admission pass as the generate routes
(`gateway.api.admit`, the model's admission queue included), then the engine's `embed`."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from engines.base import EmbedRequest
from gateway.api.admit import Call, RouteKind, admit, answer_json, engine_failure
from gateway.api.requests import Receive, Scope, error_response
from gateway.protocol import embedding_inputs, validate_embedding
from gateway.streaming import Send

if TYPE_CHECKING:
    from gateway.state import Gateway


async def _screen(gw: Gateway, call: Call) -> Any:
    return validate_embedding(call.body, call.target.spec, gw.settings)


EMBEDDINGS = RouteKind("embeddings", "embed", _screen)


async def embeddings(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    call = await admit(gw, EMBEDDINGS, scope, receive, send)
    if call is None:
        return
    record = call.record
    started = time.perf_counter()
    try:
        done = await call.target.engine.embed(
            EmbedRequest(
                body=call.body,
                model=call.target.spec.name,
                request_id=call.rid,
                inputs=embedding_inputs(call.parsed),
            )
        )
    except asyncio.CancelledError:  # the client left: still settle the gauge
        record.finished(None, None, True)
        raise
    except Exception as exc:
        error = engine_failure(exc, call)
        record.finished(None, error, False)
        await error_response(error, call.rid)(scope, receive, send)
        return
    record.finished(done.usage, None, False)
    await answer_json(call, done.body, time.perf_counter() - started)(scope, receive, send)
