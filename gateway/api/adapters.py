"""`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, with vLLM's bodies.

Admin-key protected. The path is checked against the model's adapter roots before any
worker sees it; loading reaches every worker of the base model through its engine.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse

from engines.spec import name_problem
from gateway.adapters import resolve_adapter_path
from gateway.api.auth import check_admin_key
from gateway.api.requests import Incoming, read_json
from gateway.errors import InvalidRequest, ModelNotFound

if TYPE_CHECKING:
    from gateway.state import Gateway


def _str_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name)
    return value


async def load_lora_adapter(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    check_admin_key(gw, inc)
    body = await read_json(inc, 64 * 1024)
    name = _str_field(body, "lora_name")
    raw_path = _str_field(body, "lora_path")
    base_name = _str_field(body, "base_model", required=False) or _str_field(
        body, "model", required=False
    )
    assert name is not None and raw_path is not None
    problem = name_problem(name)
    if problem is not None:
        raise InvalidRequest(f"'lora_name' {problem}.", param="lora_name")
    base = gw.served.base_for_adapter(base_name)
    path = resolve_adapter_path(base.spec, raw_path, gw.served.catalog.base_dir)
    t0 = time.perf_counter()
    loads = gw.metrics.adapter_loads
    try:
        await gw.served.load_adapter(base, name, str(path))
    except Exception:
        loads.labels(base.spec.name, "load", "error").inc()
        raise
    loads.labels(base.spec.name, "load", "ok").inc()
    await gw.adapter_sync.recorded(base.spec.name, name, str(path))
    took = time.perf_counter() - t0
    return PlainTextResponse(
        f"Success: LoRA adapter '{name}' added successfully.",
        headers={"server-timing": f"load;dur={took * 1000:.1f}"},
    )


async def unload_lora_adapter(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    check_admin_key(gw, inc)
    body = await read_json(inc, 64 * 1024)
    name = _str_field(body, "lora_name")
    assert name is not None
    try:
        base = gw.served.resolve(name).spec.name
    except ModelNotFound:
        base = "_unknown"
    try:
        await gw.served.unload_adapter(name)
    except Exception:
        gw.metrics.adapter_loads.labels(base, "unload", "error").inc()
        raise
    gw.metrics.adapter_loads.labels(base, "unload", "ok").inc()
    await gw.adapter_sync.removed(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
