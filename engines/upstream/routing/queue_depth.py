"""Scorer `queue_depth`: prefer the endpoint whose engine has the fewest requests waiting
for a batch slot, as its own `/metrics` last said (`vllm:num_requests_waiting`,
`lmdeploy:num_requests_waiting` + `num_api_requests_waiting`, normalised per worker by
`engines.upstream.worker_metrics`, so a pool may mix the two engines).

    score(e) = 1 − waiting(e) / max(waiting over candidates)     (1 when all are 0)

An endpoint never scraped counts as 0 waiting. Sees load from every gateway replica, but
only as fresh as the health interval.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest


class QueueDepthScorer:
    name = "queue_depth"
    reason = "least_loaded"  # the routing decision's reason when it decides
    needs = "load"  # the workers' /metrics, scraped at every health probe

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        waiting = [(e.load.waiting or 0) if e.load is not None else 0 for e in candidates]
        top = max(waiting)
        if top == 0:
            return [1.0] * len(candidates)
        scale = 1.0 / top
        return [1.0 - w * scale for w in waiting]
