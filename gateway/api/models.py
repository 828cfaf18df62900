"""`GET /v1/models` and `GET /v1/models/{id}`: base models, then loaded adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.api.auth import check_client_key
from gateway.api.requests import Incoming
from gateway.errors import ModelNotFound

if TYPE_CHECKING:
    from gateway.state import Gateway


async def list_models(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    await check_client_key(gw, Incoming(request.scope, request.receive))
    return JSONResponse({"object": "list", "data": gw.served.listing()})


async def get_model(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    await check_client_key(gw, Incoming(request.scope, request.receive))
    model_id = request.path_params["model_id"]
    for entry in gw.served.listing():
        if entry["id"] == model_id:
            return JSONResponse(entry)
    raise ModelNotFound(model_id)
