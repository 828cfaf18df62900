"""The router: filter → weighted scorers → pick, for one model's endpoints.

Owns the healthy / not-excluded filter, the weighted sum and the picker (highest sum;
ties broken round-robin by a rotating scan start, so an idle fleet is served in turn). Does
not own any scorer's formula (one module each in this package).
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest, Scorer

__all__ = ["Router"]

_NO_REQUEST = RoutingRequest()


class Router:
    """Picks one endpoint per attempt. `scorers` are (scorer, weight) pairs."""

    def __init__(self, scorers: Sequence[tuple[Scorer, float]]) -> None:
        self.scorers = list(scorers)
        self._rr = -1

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        request: RoutingRequest | None = None,
        exclude: Endpoint | None = None,
    ) -> Endpoint | None:
        n = len(endpoints)
        if n == 1:
            return endpoints[0] if exclude is None else None
        if n == 0:
            return None
        # Rotate the order so that ties go round-robin.
        start = self._rr = (self._rr + 1) % n
        order = [endpoints[(start + i) % n] for i in range(n)]
        candidates = [e for e in order if e.healthy and e is not exclude]
        if not candidates:
            candidates = [e for e in order if e is not exclude]
            if not candidates:
                return None
        if len(candidates) == 1:
            return candidates[0]
        req = request or _NO_REQUEST
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            for i, s in enumerate(scorer.score(candidates, req)):
                totals[i] += weight * s
        best = 0
        for i in range(1, len(candidates)):
            if totals[i] > totals[best] + 1e-12:
                best = i
        return candidates[best]
