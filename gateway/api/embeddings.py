"""`POST /v1/embeddings`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from engines.base import EmbedRequest, ServingError
from gateway.api.common import RequestRecord, check_client_key, read_json, request_id
from gateway.api.generate import _error, _Raw
from gateway.errors import InvalidRequest
from gateway.protocol import embedding_inputs, validate_embedding

if TYPE_CHECKING:
    from gateway.app import Gateway


async def embeddings(request: Request) -> Any:
    start = time.perf_counter()
    gw: Gateway = request.app.state.gateway
    record = RequestRecord(gw, "embeddings", start)
    rid = request_id(request)
    try:
        check_client_key(gw, request)
        body = await read_json(request, gw.settings.max_body_bytes)
        target = gw.served.resolve(body.get("model"))
        record.model = target.spec.name
        if target.spec.task != "embed":
            raise InvalidRequest(f"The model `{target.spec.name}` does not serve embeddings.",
                                 param="model")
        parsed = validate_embedding(body, gw.settings)
        record.begin()
        done = await target.engine.embed(EmbedRequest(
            body=body, model=target.spec.name, request_id=rid,
            inputs=embedding_inputs(parsed)))
    except ServingError as exc:
        record.finished(None, exc, False)
        return _error(exc, rid)
    record.finished(done.usage, None, False)
    return _Raw(200, done.body, [(b"content-type", b"application/json"),
                                 (b"x-request-id", rid.encode())])
