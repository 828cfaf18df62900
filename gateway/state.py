"""`Gateway`: everything one running gateway owns, built once by `create_app`.

Holds the settings, the served models (engines), the metrics, the request-id source and
the tenancy (API keys, limits, usage, and the shared state store behind them), the
access log, the tracer (when traces are on) and the status page's series.
The app's lifespan starts and stops what needs it; routes reach it as
`request.app.state.gateway` (the hot routes get it from the front door). No module-level
state anywhere.
"""

from __future__ import annotations

import logging

from engines.base import EngineContext
from gateway.access_log import AccessLog
from gateway.adapter_sync import AdapterSync
from gateway.admission import Admission
from gateway.catalog import Catalog
from gateway.ids import RequestIds
from gateway.limits import Tenancy
from gateway.metrics import Metrics
from gateway.responses.store import make_store
from gateway.series import Series
from gateway.served import ServedModels
from gateway.settings import Settings
from gateway.tracing import make_tracer

log = logging.getLogger("gateway")


def _progress(line: str) -> None:
    log.info("%s", line)


class Gateway:
    """Everything one running gateway owns."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.client_keys = settings.client_keys
        self.served = ServedModels(
            catalog=catalog,
            context=EngineContext(
                cache_dir=settings.cache_dir, config_dir=catalog.base_dir, progress=_progress
            ),
            retry_first_s=settings.start_retry_s,
        )
        self.metrics = Metrics(self.served.statuses, self.served.adapter_counts)
        self.request_ids = RequestIds()
        m = self.metrics
        self.admission = Admission(
            lambda model, s: m.admission_wait.labels(model).observe(s),
            lambda model: m.admission_rejected.labels(model).inc(),
        )
        for spec in catalog.models:
            self.admission.add(spec)
        self.access_log = AccessLog(settings.access_log, settings.access_log_sample)
        # API keys, limits and usage (gateway.limits); the store behind them.
        self.tenancy = Tenancy(settings, self.metrics)
        # Adapter desired state shared with the other front doors (gateway.adapter_sync).
        self.adapter_sync = AdapterSync(self.served, self.tenancy, enabled=bool(settings.redis_url))
        # Stored responses of /v1/responses, per key (gateway.responses.store).
        self.responses = make_store(settings)
        # OpenTelemetry traces (gateway.tracing); None when off: the request path checks it.
        self.tracer = make_tracer(settings)
        # The status page's last 15 minutes, shared by the front doors (gateway.series).
        self.series = Series(self._load_now, lambda: self.tenancy.store)

    def _load_now(self) -> dict[str, tuple[int, int, int]]:
        """Per model: requests in flight, queued at the gateway, waiting at the workers."""
        out: dict[str, list[int]] = {}
        for family in self.metrics.in_flight.collect():
            for s in family.samples:
                out.setdefault(s.labels["model"], [0, 0, 0])[0] += int(s.value)
        for name, gate in self.admission.gates.items():
            out.setdefault(name, [0, 0, 0])[1] += len(gate.waiters)
        for name, st in self.served.statuses().items():
            out.setdefault(name, [0, 0, 0])[2] += st.waiting
        return {m: (a, b, c) for m, (a, b, c) in out.items()}
