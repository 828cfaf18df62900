"""Scorer `kv_cache`: prefer the endpoint with the most free KV cache, as its engine last
reported (`vllm:kv_cache_usage_perc` or `lmdeploy:gpu_cache_usage_perc`, 0..1, read per
worker by `engines.upstream.worker_metrics`).

    score(e) = 1 − kv_cache_usage(e)          (1 when never scraped)

A full cache means preemption or queueing for the next long prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest


class KVCacheScorer:
    name = "kv_cache"
    reason = "least_loaded"  # the routing decision's reason when it decides
    needs = "load"  # the workers' /metrics, scraped at every health probe

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        out = []
        for e in candidates:
            kv = e.load.kv_cache_usage if e.load is not None else None
            out.append(1.0 if kv is None else max(0.0, 1.0 - min(1.0, kv)))
        return out
