"""Every metric the gateway exports, declared once, prefix `gateway_`.

Owns the Prometheus registry of one app instance (no process-global registry, so tests can
run several apps), the bounded label sets (model, route, status class, error type, worker)
and a collector that reads the engines' own figures at scrape time. It does not decide what
to measure when; the request path calls the small helpers here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engines.base import EngineStatus

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
# End to end: long generations and queued requests run for minutes; up to 15.
_E2E_BUCKETS = (*_LATENCY_BUCKETS, 300.0, 600.0, 900.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineCollector(Collector):
    """Reads each engine's status at scrape time: nothing on the request path."""

    def __init__(self, statuses: Callable[[], dict[str, EngineStatus]]):
        self._statuses = statuses

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        running = GaugeMetricFamily(
            "gateway_engine_running_sequences", "Sequences running in the engine", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "gateway_engine_waiting_sequences",
            "Sequences waiting for an engine slot",
            labels=["model"],
        )
        ready = GaugeMetricFamily(
            "gateway_engine_ready", "1 if the engine serves", labels=["model"]
        )
        healthy = GaugeMetricFamily(
            "gateway_worker_healthy", "1 if the worker is healthy", labels=["model", "worker"]
        )
        w_running = GaugeMetricFamily(
            "gateway_worker_running_requests",
            "Requests running on the worker (its own figure)",
            labels=["model", "worker"],
        )
        w_waiting = GaugeMetricFamily(
            "gateway_worker_waiting_requests",
            "Requests queued on the worker (its own figure)",
            labels=["model", "worker"],
        )
        kv = GaugeMetricFamily(
            "gateway_worker_kv_cache_usage_ratio",
            "KV-cache use on the worker, 0..1",
            labels=["model", "worker"],
        )
        restarts = GaugeMetricFamily(
            "gateway_worker_restarts",
            "Times the gateway restarted the worker (launched workers only)",
            labels=["model", "worker"],
        )
        accept = GaugeMetricFamily(
            "gateway_worker_spec_decode_acceptance_ratio",
            "Accepted / drafted speculative tokens since worker start",
            labels=["model", "worker"],
        )
        # Failure handling and placement (engine counters, `EngineStatus.counters`): retries,
        # retry_budget_exhausted, ejections, wedged, fast_fails, panic_routes (attempts sent
        # to ejected workers because too many were ejected), continuations (mid-stream),
        # adapter_loads / evictions / hits / misses, start_failures.
        events = CounterMetricFamily(
            "gateway_engine_events",
            "Engine events by kind (retries, budget exhaustion, ejections, panic routes, "
            "adapter loads...)",
            labels=["model", "event"],
        )
        ejected = GaugeMetricFamily(
            "gateway_worker_ejected",
            "1 while outlier ejection holds the worker out",
            labels=["model", "worker"],
        )
        ejections = CounterMetricFamily(
            "gateway_worker_ejections",
            "Outlier ejections of the worker",
            labels=["model", "worker"],
        )
        retries = CounterMetricFamily(
            "gateway_upstream_retries",
            "Requests re-sent to another worker before their first byte",
            labels=["model"],
        )
        decisions = CounterMetricFamily(
            "gateway_routing_decisions",
            "Workers chosen, by the rule that decided (least_loaded, prefix_affinity, "
            "session_affinity, lora_held, lora_placed, bounded_load_overflow, tie, retry, "
            "only_choice, panic)",
            labels=["model", "reason"],
        )
        for model, st in self._statuses().items():
            for reason, picks in st.decisions.items():
                decisions.add_metric([model, reason], picks)
            for event, value in st.counters.items():
                events.add_metric([model, event], value)
            retries.add_metric([model], st.counters.get("retries", 0.0))
            for w in st.workers:
                ejected.add_metric([model, w.url], 1.0 if w.ejected else 0.0)
                ejections.add_metric([model, w.url], w.ejections)
            running.add_metric([model], st.running)
            waiting.add_metric([model], st.waiting)
            ready.add_metric([model], 1.0 if st.ready else 0.0)
            for w in st.workers:
                healthy.add_metric([model, w.url], 1.0 if w.healthy else 0.0)
                if w.running is not None:
                    w_running.add_metric([model, w.url], w.running)
                if w.waiting is not None:
                    w_waiting.add_metric([model, w.url], w.waiting)
                if w.kv_cache_usage is not None:
                    kv.add_metric([model, w.url], w.kv_cache_usage)
                count = getattr(w, "restarts", None)  # reported by launching engines
                if count is not None:
                    restarts.add_metric([model, w.url], count)
                if w.spec_draft_tokens:
                    accept.add_metric(
                        [model, w.url], (w.spec_accepted_tokens or 0.0) / w.spec_draft_tokens
                    )
        yield from (running, waiting, ready, healthy, w_running, w_waiting, kv, restarts, accept)
        yield from (events, retries, ejected, ejections, decisions)


def observe_many(hist: Histogram, values: list[float]) -> None:
    """`hist.observe(v)` for every v in `values` (one labelled child, no exemplars), with
    one increment per bucket touched instead of two locked increments per value.

    Why: the stream relay hands over a stream's inter-chunk gaps once at its end;
    prometheus-client's `observe` per chunk (a lock, a walk over the bounds) measured
    3.2 µs per value, this 0.4 µs (33 gaps, the ITL buckets; docs/benchmarks.md).
    Relies on prometheus-client's histogram internals (`_upper_bounds`, `_buckets`,
    `_sum`, as in 0.26); tests/gateway/test_observe_many.py checks the samples equal `observe`'s."""
    bounds = hist._upper_bounds
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1
    buckets = hist._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    hist._sum.inc(sum(values))


class RouteMetrics:
    """The labelled children one (model, route) pair updates on every request, resolved
    once: prometheus-client's `labels()` was 6–9% of the gateway's CPU under load."""

    __slots__ = (
        "completion_tokens",
        "direct_blocks",
        "duration",
        "in_flight",
        "itl",
        "loop_blocks",
        "ok",
        "prompt_tokens",
        "ttft",
    )

    def __init__(self, m: Metrics, model: str, route: str):
        self.in_flight = m.in_flight.labels(model, route)
        self.duration = m.duration.labels(model, route)
        self.ok = m.requests.labels(model, route, "2xx")
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.completion_tokens = m.completion_tokens.labels(model)
        self.direct_blocks = m.stream_blocks.labels(model, "direct")
        self.loop_blocks = m.stream_blocks.labels(model, "loop")


class Metrics:
    def __init__(
        self,
        statuses: Callable[[], dict[str, EngineStatus]],
        adapters: Callable[[], dict[str, int]],
    ):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "Requests answered", ["model", "route", "status_class"], registry=r
        )
        self.errors = Counter(
            "gateway_errors",
            "Errors answered, by OpenAI error type",
            ["model", "route", "type"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being served", ["model", "route"], registry=r
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Request duration, first byte in to last byte out",
            ["model", "route"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Gap between streamed chunks",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens", ["model"], registry=r
        )
        self.stream_blocks = Counter(
            "gateway_stream_blocks",
            "Streamed blocks relayed, by path: `direct` (written from the upstream "
            "connection's callback) or `loop` (through the relay task)",
            ["model", "path"],
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited", "Requests refused with 429", ["model"], registry=r
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects", "Requests abandoned by the client", ["model"], registry=r
        )
        self.adapters_loaded = Gauge(
            "gateway_adapters_loaded", "LoRA adapters loaded", ["model"], registry=r
        )
        self.admission_wait = Histogram(
            "gateway_admission_wait_seconds",
            "Time a request waited in its model's admission queue",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.admission_rejected = Counter(
            "gateway_admission_rejected",
            "Requests refused with 503 by the admission queue (full or waited too long)",
            ["model"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "gateway_adapter_loads",
            "Adapter load and unload requests, by outcome",
            ["model", "op", "outcome"],
            registry=r,
        )
        # process_* series: CPU seconds, resident memory, open files, start time.
        ProcessCollector(registry=r)
        self.store_degraded = Gauge(
            "gateway_state_store_degraded",
            "1 while the shared state store (Redis) does not answer",
            registry=r,
        )
        self.key_outcomes = Counter(
            "gateway_key_requests",
            "API-key requests settled, by outcome (full, partial, aborted, error); never by key",
            ["model", "outcome"],
            registry=r,
        )
        # Per API key (hashed keys only): the key's id as a label, never the key. Bounded by
        # the keys the admin issued (an unknown or malformed key never reaches these; a
        # revoked key's series stay until restart): the tenants panels of the dashboard.
        self.key_tokens = Counter(
            "gateway_key_tokens",
            "Tokens billed per API key id (as the usage ledger), by kind (prompt, completion)",
            ["key_id", "kind"],
            registry=r,
        )
        self.key_rate_limited = Counter(
            "gateway_key_rate_limited",
            "Requests refused with 429 per API key id, by reason (requests, tokens, "
            "parallel, held, budget)",
            ["key_id", "reason"],
            registry=r,
        )
        self._keys: dict[str, tuple[Counter, Counter]] = {}
        self._adapters = adapters
        self._routes: dict[tuple[str, str], RouteMetrics] = {}
        r.register(_EngineCollector(statuses))

    def key_used(self, key_id: str, prompt: int, completion: int) -> None:
        """A settled request's tokens for its key (children resolved once per key)."""
        found = self._keys.get(key_id)
        if found is None:
            kt = self.key_tokens
            found = self._keys[key_id] = (
                kt.labels(key_id, "prompt"),
                kt.labels(key_id, "completion"),
            )
        if prompt:
            found[0].inc(prompt)
        if completion:
            found[1].inc(completion)

    def route(self, model: str, route: str) -> RouteMetrics:
        key = (model, route)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = RouteMetrics(self, model, route)
        return found

    def render(self) -> bytes:
        for model, count in self._adapters().items():
            self.adapters_loaded.labels(model).set(count)
        return generate_latest(self.registry)
