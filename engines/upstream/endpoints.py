"""One upstream worker as the relay sees it: its connection pool, request heads, load and
health.

Owns `Endpoint` (state the hot path reads and writes: outstanding requests, health, the
figures scraped from the worker's `/metrics`) and base-URL normalisation. Does not own how
an endpoint is chosen (`engines.upstream.routing`), checked (`engines.upstream.engine`'s
health loop) or what its metrics mean per engine (`read_worker_metrics` hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.base import WorkerStatus
from engines.upstream import http1

__all__ = ["Endpoint", "base_url"]


def base_url(url: str) -> str:
    """`http://host:port` from a worker URL given with or without a trailing `/v1`."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


@dataclass(slots=True, eq=False)
class Endpoint:
    """One upstream worker: its connection pool, request heads (built once), load and
    health."""

    url: str
    pool: http1.Pool | None = None
    # Per route: request line, Host and the fixed headers (see `connect`).
    chat: bytes = b""
    completions: bytes = b""
    embeddings: bytes = b""
    # Requests this gateway has in flight on the worker (raised at send, lowered at end).
    outstanding: int = 0
    healthy: bool = False
    detail: str = "not checked yet"
    # Why the worker answers but cannot serve the model as configured (its /v1/models does
    # not list the name the gateway sends; `engines.upstream.health`), "" when it can.
    misconfigured: str = ""
    # Outlier state (`engines.upstream.outliers`): consecutive failures, taken out of
    # routing until `ejected_until` (loop time), half-open after re-admission (one request
    # at a time until one succeeds), ejections in a row (the next ejection's length) and
    # in total, and the last failure seen.
    failures: int = 0
    ejected: bool = False
    ejected_until: float = 0.0
    half_open: bool = False
    eject_streak: int = 0
    ejections: int = 0
    last_error: str = ""
    # Adapters this worker holds, least recently used first (on-demand placement only,
    # `engines.upstream.adapters`), and how many it may hold.
    adapters: dict[str, None] = field(default_factory=dict)
    adapter_slots: int = 0
    # Raw metric sums from the last scrape, and the engine-neutral reading of them
    # (running, waiting, KV-cache use) that routing scorers use.
    metrics: dict[str, float] = field(default_factory=dict)
    load: WorkerStatus | None = None

    @classmethod
    def make(cls, url: str) -> Endpoint:
        return cls(url=base_url(url))

    def connect(self, headers: dict[str, str], connect_timeout: float, read_timeout: float) -> None:
        pool = self.pool = http1.Pool(
            self.url, connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        self.chat = pool.request_head("POST", "/v1/chat/completions", headers)
        self.completions = pool.request_head("POST", "/v1/completions", headers)
        self.embeddings = pool.request_head("POST", "/v1/embeddings", headers)
