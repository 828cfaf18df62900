"""Health of one model's workers: the start-up wait, the background probe loop, half-open
re-admission of ejected workers, and wedge detection.

Owns probing (`GET health_path`, then a scrape of `/metrics` into `Endpoint.load`),
marking workers healthy or down, re-applying adapters to a worker that comes back (through
a callback), re-admitting an ejected worker half-open once its ejection time is up and a
probe passes, and treating a probe that hangs while requests are in flight as a wedged
worker: it is ejected and its in-flight requests are failed at once (streams end with an
error event). It also deposits the retry budget's requests every round.

A worker that does not serve the model's name is misconfigured, not healthy: its
`/v1/models` (vLLM, SGLang and LMDeploy list their served names) is read when it comes up
and every `MODELS_EVERY_S` (while misconfigured: at every probe), and when it lists names
but not the one the gateway sends (`served_model_name`, else the model's name), one
warning names both and the key to set, and the worker is kept out of routing with a
detail starting `misconfigured:` (what `/health` and the status page show) until it
lists it. Without the check every request got the worker's 404. A worker without
`/v1/models`, or that answers it with an error, is not judged. Does not own what counts as a
request failure or the ejection rule (`engines.upstream.outliers`) nor routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import orjson

from engines.base import MISCONFIGURED, ServingError, WorkerStatus
from engines.upstream import http1
from engines.upstream.endpoints import Endpoint
from engines.upstream.options import UpstreamOptions
from engines.upstream.outliers import Outliers, RetryBudget
from engines.upstream.prom_text import sum_samples

__all__ = ["HealthChecks"]

log = logging.getLogger("engines.upstream")

# How often a serving worker's /v1/models is read again (one GET; a worker restarted with
# another model is caught within this).
MODELS_EVERY_S = 15.0

ReadMetrics = Callable[[dict[str, float], WorkerStatus], None]
OnBack = Callable[[aiohttp.ClientSession, Endpoint], Awaitable[None]]


class HealthChecks:
    """Probes of one model's endpoints (`run()` is the background loop)."""

    def __init__(
        self,
        model: str,
        opts: UpstreamOptions,
        metric_families: tuple[str, ...],
        read_metrics: ReadMetrics,
        on_back: OnBack,
        outliers: Outliers,
        budget: RetryBudget,
        metrics_every_s: float = 0.0,
        served_name: str | None = None,
    ) -> None:
        self.model = model
        # The name the gateway sends as `model` (None: not checked).
        self.served_name = served_name
        self._next_models: dict[str, float] = {}
        self.opts = opts
        self.metric_families = metric_families
        # A worker's /metrics is scraped at most this often (0: at every probe).
        self.metrics_every_s = metrics_every_s
        self._next_scrape: dict[str, float] = {}
        self.read_metrics = read_metrics
        self.on_back = on_back
        self.outliers = outliers
        # The retry budget's tokens live `retry_budget_window_s`; this loop deposits them.
        self.budget = budget
        budget.ttl_s = opts.retry_budget_window_s
        self.timeout = aiohttp.ClientTimeout(total=opts.health_timeout_s)
        self.wedged = 0

    async def round(self, session: aiohttp.ClientSession, endpoints: Sequence[Endpoint]) -> None:
        await asyncio.gather(*(self.probe(session, ep) for ep in endpoints))

    async def run(
        self,
        session: Callable[[], aiohttp.ClientSession | None],
        endpoints: Callable[[], Sequence[Endpoint]],
    ) -> None:
        interval = self.opts.health_interval_s
        while True:
            await asyncio.sleep(interval)
            self.budget.roll()
            s = session()
            if s is None:
                continue
            try:
                await self.round(s, endpoints())
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die; the next round retries
                log.exception("health check of %s failed", self.model)

    async def probe(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        """Check one worker; scrape its metrics; re-apply adapters when it comes back;
        re-admit it half-open when its ejection is over."""
        hung = False
        try:
            async with session.get(ep.url + self.opts.health_path, timeout=self.timeout) as r:
                await r.read()
                ok, detail = r.status < 500, f"health answered {r.status}"
        except TimeoutError as e:
            ok, detail, hung = False, f"health check hung: {e!r}", True
        except (aiohttp.ClientError, OSError) as e:
            ok, detail = False, f"health check failed: {e!r}"
        if ok and self.metric_families and self._scrape_due(ep):
            try:
                async with session.get(ep.url + "/metrics", timeout=self.timeout) as r:
                    if r.status == 200:
                        ep.metrics = sum_samples(await r.text(), self.metric_families)
                        load = WorkerStatus(url=ep.url, healthy=True)
                        self.read_metrics(ep.metrics, load)
                        ep.load = load
            except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
                pass  # metrics are best effort; health decides
        if ok and self.served_name is not None and self._models_due(ep):
            await self._check_models(session, ep, self.served_name)
        if ok and ep.misconfigured:
            ok, detail = False, ep.misconfigured
        if not ok:
            ep.healthy, ep.detail = False, detail
            if hung and ep.outstanding:
                self.wedge(ep, detail)
            return
        now = asyncio.get_running_loop().time()
        if not ep.healthy:
            # Back (or up for the first time): it may have restarted without our adapters.
            try:
                await self.on_back(session, ep)
            except ServingError as e:
                ep.detail = f"re-applying adapters failed: {e.message}"
                return
            ep.healthy, ep.detail = True, "ok"
        if self.outliers.due(ep, now):
            self.outliers.readmit(ep)
            ep.detail = "ok (re-admitted half-open)"

    def _scrape_due(self, ep: Endpoint) -> bool:
        now = asyncio.get_running_loop().time()
        if now < self._next_scrape.get(ep.url, 0.0):
            return False
        self._next_scrape[ep.url] = now + self.metrics_every_s
        return True

    def _models_due(self, ep: Endpoint) -> bool:
        now = asyncio.get_running_loop().time()
        if ep.healthy and now < self._next_models.get(ep.url, 0.0):
            return False
        self._next_models[ep.url] = now + max(MODELS_EVERY_S, self.metrics_every_s)
        return True

    async def _check_models(self, session: aiohttp.ClientSession, ep: Endpoint, want: str) -> None:
        """Read the worker's /v1/models; set or clear `ep.misconfigured`, saying so once
        per change."""
        try:
            async with session.get(ep.url + "/v1/models", timeout=self.timeout) as r:
                obj = orjson.loads(await r.read()) if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError):
            return  # not judged: the probe decides
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list):
            return
        models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        ids = [m["id"] for m in models]
        if not ids or want in ids:
            if ep.misconfigured:
                log.warning("model %r: worker %s now serves %r", self.model, ep.url, want)
            ep.misconfigured = ""
            return
        # Its base models (not its adapters) are what served_model_name may name.
        bases = [m["id"] for m in models if not m.get("parent")] or ids
        served = ", ".join(repr(i) for i in bases)
        why = (
            f"{MISCONFIGURED}the worker serves {served}, not {want!r}; set "
            f"served_model_name: {bases[0]} on model {self.model!r} in models.yaml"
        )
        if why != ep.misconfigured:
            log.warning("model %r: worker %s: %s", self.model, ep.url, why)
        ep.misconfigured = why

    def wedge(self, ep: Endpoint, why: str) -> None:
        """A worker that stopped answering with requests in flight: eject it and fail its
        in-flight requests now rather than at their read timeouts."""
        self.wedged += 1
        ep.last_error = f"wedged: {why}"
        if not ep.ejected:
            self.outliers.eject(ep, asyncio.get_running_loop().time())
        if ep.pool is not None:
            ep.pool.fail_busy(http1.ProtocolError(f"{ep.url} is wedged ({why})"))
