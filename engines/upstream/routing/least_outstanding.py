"""Scorer `least_outstanding`: prefer the endpoint with the fewest requests this gateway
has in flight on it.

    score(e) = 1 − outstanding(e) / max(outstanding over candidates)     (1 when all are 0)

The gateway's own count, exact and current (no scrape delay); blind to work other gateway
replicas send to the same worker.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest


class LeastOutstandingScorer:
    name = "least_outstanding"
    reason = "least_loaded"  # the routing decision's reason when it decides

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        outs = [e.outstanding for e in candidates]
        top = max(outs)
        if top == 0:
            return [1.0] * len(outs)
        scale = 1.0 / top  # one division, not one per endpoint
        return [1.0 - o * scale for o in outs]
