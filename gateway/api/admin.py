"""The key admin API, on the admin key: `/admin/keys` (create, list), `/admin/keys/{id}`
(read, revoke with DELETE) and `/admin/keys/{id}/usage` (the ledger by day and model).

Thin HTTP over `gateway.key_admin.KeyAdmin`, which `gateway keys` uses too. The plaintext
key appears once, in the answer to create.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.api.auth import check_admin_key
from gateway.api.requests import Incoming, read_json
from gateway.key_admin import KeyAdmin

if TYPE_CHECKING:
    from gateway.state import Gateway


def _admin(request: Request) -> tuple[KeyAdmin, Incoming]:
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    check_admin_key(gw, inc)
    return KeyAdmin(gw.tenancy), inc


async def create_key(request: Request) -> Any:
    admin, inc = _admin(request)
    policy = await read_json(inc, 64 * 1024)
    token, record = await admin.create(policy)
    return JSONResponse({"key": token, **record.public()}, status_code=201)


async def list_keys(request: Request) -> Any:
    admin, _ = _admin(request)
    return JSONResponse({"object": "list", "data": await admin.list()})


async def get_key(request: Request) -> Any:
    admin, _ = _admin(request)
    return JSONResponse((await admin.get(request.path_params["key_id"])).public())


async def revoke_key(request: Request) -> Any:
    admin, _ = _admin(request)
    return JSONResponse(await admin.revoke(request.path_params["key_id"]))


async def key_usage(request: Request) -> Any:
    admin, _ = _admin(request)
    return JSONResponse(await admin.usage(request.path_params["key_id"]))
