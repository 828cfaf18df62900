"""Operator routes: `GET /health` (liveness + readiness of every engine; worker details
only with the admin key), the probes `GET /health/live` and `GET /health/ready`, and
`GET /metrics`."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from gateway.state import Gateway


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
        entry: dict[str, Any] = {
            "ready": st.ready,
            "state": "ready" if st.ready else "unavailable",
            "workers": {"healthy": healthy, "total": len(st.workers)},
        }
        if admin:
            entry["detail"] = st.detail
            entry["workers"]["list"] = [
                {"url": w.url, "healthy": w.healthy, "detail": w.detail} for w in st.workers
            ]
        models[name] = entry
    ready = bool(statuses) and all(st.ready for st in statuses.values())
    return JSONResponse(
        {"status": "ok" if ready else "degraded", "models": models},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def live(request: Request) -> Any:
    """Liveness: the process answers (a restart would not help anything else)."""
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> Any:
    """Readiness: 200 when any model can serve, else 503 (take it out of the Service)."""
    gw: Gateway = request.app.state.gateway
    if any(st.ready for st in gw.served.statuses().values()):
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready"}, status_code=503)
