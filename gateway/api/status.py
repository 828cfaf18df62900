"""`GET /status`: what the status page (`/ui`) shows, as one JSON document.

Per model: readiness, the engine's queue, adapters and each worker's health, in-flight,
queue, KV-cache use, restarts and ejections (null where the engine does not report it);
`GET /status/series`: the charts' last 15 minutes (`gateway.series`); for the
whole gateway: request counts by status class and the cumulative latency histograms, from
which the page computes the live rate and percentiles between two polls. Needs the client
key when keys are set; worker URLs and details only with the admin key (as `/health`:
the page must not map the network behind the gateway for any client). Reads the engines'
status and the metrics registry; owns nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from engines.base import ServingError
from gateway.api.auth import check_admin_key, check_client_key
from gateway.api.ops import worker_state
from gateway.api.requests import Incoming

if TYPE_CHECKING:
    from gateway.state import Gateway

_HISTOGRAMS = {
    "gateway_request_duration_seconds": "duration",
    "gateway_time_to_first_token_seconds": "ttft",
    "gateway_inter_token_latency_seconds": "itl",
}


def _traffic(gw: Gateway) -> dict[str, Any]:
    by_status: dict[str, float] = defaultdict(float)
    in_flight = 0.0
    hist: dict[str, dict[float, float]] = {key: defaultdict(float) for key in _HISTOGRAMS.values()}
    for family in gw.metrics.registry.collect():
        if family.name == "gateway_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    by_status[s.labels["status_class"]] += s.value
        elif family.name == "gateway_requests_in_flight":
            in_flight = sum(s.value for s in family.samples)
        elif family.name in _HISTOGRAMS:
            key = _HISTOGRAMS[family.name]
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    hist[key][float(s.labels["le"])] += s.value
    return {
        "requests": dict(by_status),
        "in_flight": in_flight,
        # Cumulative counts per upper bound (seconds), ascending; the last is +Inf.
        "histograms": {
            key: [[le if le != float("inf") else None, n] for le, n in sorted(h.items())]
            for key, h in hist.items()
        },
    }


async def status(request: Request) -> Any:
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    try:
        check_admin_key(gw, inc)
        admin = True
    except ServingError:
        admin = False
        await check_client_key(gw, inc)
    listing = gw.served.listing()
    models = []
    for name, engine in gw.served.engines.items():
        st = engine.status()
        spec = engine.spec
        models.append(
            {
                "name": name,
                "engine": spec.engine,
                "task": spec.task,
                "ready": st.ready,
                "detail": st.detail if admin else "",
                "running": st.running,
                "waiting": st.waiting,
                "adapters": [e["id"] for e in listing if e["parent"] == name],
                "workers": [
                    {
                        "url": w.url if admin else f"worker {i + 1}",
                        "healthy": w.healthy,
                        "state": worker_state(w),
                        "detail": w.detail if admin else "",
                        "running": w.running,
                        "waiting": w.waiting,
                        "kv_cache_usage": w.kv_cache_usage,
                        "restarts": getattr(w, "restarts", None),
                        "outstanding": w.outstanding,
                        "ejected": w.ejected,
                        "ejections": w.ejections,
                    }
                    for i, w in enumerate(st.workers)
                ],
            }
        )
    return JSONResponse({"models": models, "traffic": _traffic(gw)})


async def series(request: Request) -> Any:
    """`GET /status/series`: the last 15 minutes per model in 10-second buckets, every
    front door's added up (`gateway.series`); the page's charts. Same key rule as /status."""
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    try:
        check_admin_key(gw, inc)
    except ServingError:
        await check_client_key(gw, inc)
    return JSONResponse(await gw.series.snapshot())
