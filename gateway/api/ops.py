"""Operator routes: `GET /health/live` (the process answers), `GET /health/ready` (the
configured models can serve: `GATEWAY_READY_WHEN`), `GET /health` (200 only when every
model serves, for monitoring; every model and worker with its state, restarts, ejections
and requests in flight; worker URLs, details and last errors only with the admin key) and
`GET /metrics`.

Readiness is per model, never "every model or nothing": one dead model does not take the
gateway out of a load balancer while the others serve (unless `GATEWAY_READY_WHEN=all`).
While draining (SIGTERM) readiness answers 503 at once. A public health check must not map
the network behind the gateway, hence no URLs without the admin key.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.base import MISCONFIGURED, WorkerStatus

if TYPE_CHECKING:
    from engines.base import EngineStatus
    from gateway.state import Gateway

_RETRY = {"Retry-After": "5"}


def _ready(gw: Gateway, statuses: dict[str, EngineStatus]) -> tuple[bool, str]:
    """Whether the gateway is ready under `GATEWAY_READY_WHEN` (any | all | model names,
    comma-separated), and why not."""
    if gw.served.draining:
        return False, "draining"
    rule = gw.settings.ready_when.strip()
    if rule == "all":
        names = list(statuses)
        need_all = True
    elif rule == "any":
        names, need_all = list(statuses), False
    else:
        names, need_all = [n.strip() for n in rule.split(",") if n.strip()], True
    ready = [n for n in names if n in statuses and statuses[n].ready]
    ok = bool(names) and (len(ready) == len(names) if need_all else bool(ready))
    if ok:
        return True, "ready"
    down = [n for n in names if n not in ready]
    return False, f"not ready: {', '.join(down) or 'no models'}"


def worker_state(w: WorkerStatus) -> str:
    """healthy, ejected, misconfigured (answers, but cannot serve the model as configured)
    or down."""
    if w.ejected:
        return "ejected"
    if w.healthy:
        return "healthy"
    return "misconfigured" if w.detail.startswith(MISCONFIGURED) else "down"


def _is_admin(gw: Gateway, request: Request) -> bool:
    admin = gw.settings.admin_key
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    return bool(admin) and scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), admin)


async def health(request: Request) -> Any:
    """States for anyone; worker URLs and details only with the admin key (a public
    health check must not map the network behind the gateway)."""
    gw: Gateway = request.app.state.gateway
    statuses = gw.served.statuses()
    admin = _is_admin(gw, request)
    models: dict[str, Any] = {}
    for name, st in statuses.items():
        healthy = sum(w.healthy for w in st.workers)
        workers: list[dict[str, Any]] = []
        for i, w in enumerate(st.workers):
            row: dict[str, Any] = {
                "id": i,
                "state": worker_state(w),
                "healthy": w.healthy,
                "restarts": w.restarts,
                "ejections": w.ejections,
                "in_flight": w.outstanding,
            }
            if admin:
                row |= {"url": w.url, "detail": w.detail, "last_error": w.last_error}
            workers.append(row)
        entry: dict[str, Any] = {
            "ready": st.ready,
            "state": "ready" if st.ready else "unavailable",
            "workers": {"healthy": healthy, "total": len(st.workers), "list": workers},
        }
        if admin:
            entry["detail"] = st.detail
        models[name] = entry
    # 200 only when every model serves (for monitoring); the probe is /health/ready.
    _ok, why = _ready(gw, statuses)
    every = bool(statuses) and all(st.ready for st in statuses.values())
    every = every and not gw.served.draining
    return JSONResponse(
        {"status": "ok" if every else "degraded", "ready": why, "models": models},
        status_code=200 if every else 503,
        headers=None if every else _RETRY,
    )


async def live(request: Request) -> Any:
    """Liveness: the process answers (restarting it would not help anything else)."""
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> Any:
    """Readiness (`GATEWAY_READY_WHEN`); 503 with Retry-After while not ready or draining."""
    gw: Gateway = request.app.state.gateway
    ok, why = _ready(gw, gw.served.statuses())
    if ok:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": why}, status_code=503, headers=_RETRY)


async def metrics(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
