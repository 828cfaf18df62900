"""The `options:` every engine that relays to OpenAI-compatible workers accepts.

Owns timeouts, health-check knobs, the retry budget, outlier-ejection and panic-routing
knobs and request-id forwarding for the upstream hop. The launched engines
(`engines.launch`) and the simulator engine extend this model.

Timeouts (never a total on a stream): `connect_timeout_s` (TCP connect), `first_byte_timeout_s`
(a stream's status line, headers and first body bytes; past it the request is retried on
another worker, since nothing has reached the client yet), `read_timeout_s` (the longest
silence between two reads after that, and the whole wait for a non-streamed answer, which a
worker sends only when the generation ends).

`continue_streams` (off by default) turns on mid-stream continuation
(`engines.upstream.continuation`): a stream whose worker dies after the first byte went out
is continued on another worker from the text already streamed.
"""

from __future__ import annotations

from pydantic import Field

from engines.options import EngineOptions

__all__ = ["UpstreamOptions"]


class UpstreamOptions(EngineOptions):
    """Options of engine "openai" (and the base of vllm / lmdeploy / sim)."""

    connect_timeout_s: float = Field(default=10.0, gt=0)
    # A stream's headers and first body bytes (prefill of a long prompt in a queue: generous).
    first_byte_timeout_s: float = Field(default=120.0, gt=0)
    # Longest silence while reading a response (streamed or not); a non-streamed answer of a
    # long generation arrives only at its end, so this is generous.
    read_timeout_s: float = Field(default=600.0, gt=0)
    # Retries on another worker before the first byte reaches the client (per request), and
    # the budget over all requests, a token bucket with a time-to-live (Finagle's): each
    # request deposits `retry_budget_ratio` of a retry, each retry takes one, both count
    # for `retry_budget_window_s`, and `retry_budget_min` retries per window are always
    # allowed: retries in any window ≤ retry_budget_min + ratio × requests
    # (`engines.upstream.outliers.RetryBudget`).
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    retry_budget_min: int = Field(default=3, ge=0)
    retry_budget_window_s: float = Field(default=10.0, gt=0)
    # Outlier ejection: after this many consecutive failures (connect errors, resets, 5xx
    # that are not backpressure, timeouts) a worker is taken out for eject_base_s, doubled
    # on each ejection in a row up to eject_max_s, then re-admitted half-open (one request
    # at a time until one succeeds) once a health probe passes.
    eject_after_failures: int = Field(default=5, ge=1)
    eject_base_s: float = Field(default=5.0, gt=0)
    eject_max_s: float = Field(default=300.0, gt=0)
    # Panic routing (Envoy's panic threshold): when at least this share of the healthy
    # workers (health probe passing) is ejected, route over all of them, ejected ones
    # included, rather than answer 503: a lone worker that returned a few 5xx keeps
    # serving. 1 (the default): only when every healthy worker is ejected; 0.5: when half
    # or more are; null: never (fail fast with 503 + Retry-After). Counted as the engine
    # event `panic_routes` and the routing reason `panic`.
    panic_threshold: float | None = Field(default=1.0, gt=0, le=1)
    health_interval_s: float = Field(default=5.0, gt=0)
    # How often a health probe also scrapes the worker's /metrics. Unset: at every probe
    # when a routing scorer reads the workers' load (queue_depth, kv_cache), else every
    # METRICS_IDLE_S (what /health and the gateway's /metrics show of the engines is then
    # that fresh). Each scrape makes the worker render its whole exposition in its API
    # server, and every front door of `serve --workers N` scrapes every worker.
    metrics_interval_s: float | None = Field(default=None, gt=0)
    health_timeout_s: float = Field(default=3.0, gt=0)
    # How long `start()` waits for a first healthy endpoint.
    start_timeout_s: float = Field(default=60.0, gt=0)
    adapter_timeout_s: float = Field(default=120.0, gt=0)
    # GET this path to check a worker ("/v1/models" for upstreams without /health); any
    # status below 500 counts as alive.
    health_path: str = Field(default="/health", pattern=r"^/")
    # Send the gateway's request id as X-Request-Id (vLLM uses it as its request id).
    forward_request_id: bool = True
    # Mid-stream continuation (`engines.upstream.continuation`): needs ≥ 2 workers that
    # accept vLLM's `continue_final_message` (chat) — checked at config load.
    continue_streams: bool = False
