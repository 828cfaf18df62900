"""`POST /v1/embeddings`: a raw ASGI handler like the generate routes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from engines.base import EmbedRequest, ServingError
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
from gateway.protocol import embedding_inputs, validate_embedding
from gateway.redact import public_error
from gateway.streaming import Send

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.embeddings")


async def embeddings(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    start = time.perf_counter()
    record = RequestRecord(gw, "embeddings", start)
    inc = Incoming(scope, receive)
    rid = request_id(inc, gw.request_ids)
    record.identify(inc, rid)
    try:
        tenant = await check_client_key(gw, inc)
        body = await read_json(inc, gw.settings.max_body_bytes)
        target = gw.served.resolve(body.get("model"))
        record.model = target.spec.name
        if target.spec.task != "embed":
            raise InvalidRequest(
                f"The model `{target.spec.name}` does not serve embeddings.", param="model"
            )
        parsed = validate_embedding(body, target.spec, gw.settings)
        if tenant is not None:
            record.ticket = await gw.tenancy.admit(tenant, target.spec.name, body)
        record.begin()
        try:
            done = await target.engine.embed(
                EmbedRequest(
                    body=body,
                    model=target.spec.name,
                    request_id=rid,
                    inputs=embedding_inputs(parsed),
                )
            )
        except ServingError as exc:
            raise public_error(exc, target.spec.name, rid) from None
        except asyncio.CancelledError:  # the client left: still settle the gauge
            record.finished(None, None, True)
            raise
        except Exception as exc:  # an engine bug: a 500 envelope, counted as an error
            log.exception("engine %s failed", target.spec.name, exc_info=exc)
            raise ServingError("The engine failed while processing the request.") from None
    except ServingError as exc:
        record.finished(None, exc, False)
        await error_response(exc, rid)(scope, receive, send)
        return
    record.finished(done.usage, None, False)
    await RawResponse(
        200, done.body, [(b"content-type", b"application/json"), (b"x-request-id", rid.encode())]
    )(scope, receive, send)
