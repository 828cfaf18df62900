"""Operator routes: `GET /health` (liveness + readiness of every engine) and `GET /metrics`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from gateway.state import Gateway


async def health(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    statuses = gw.served.statuses()
    models = {
        name: {
            "ready": st.ready,
            "detail": st.detail,
            "workers": [{"url": w.url, "healthy": w.healthy} for w in st.workers],
        }
        for name, st in statuses.items()
    }
    ready = bool(statuses) and all(st.ready for st in statuses.values())
    return JSONResponse(
        {"status": "ok" if ready else "degraded", "models": models},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
