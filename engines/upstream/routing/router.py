"""The router: filter → weighted scorers → pick, for one model's endpoints.

Owns the filters and the picker; does not own any scorer's formula (one module each in this
package). The filters, in order, each one attribute read per endpoint:

    healthy     the last health probe (or connect attempt) succeeded
    not ejected outlier ejection (`engines.upstream.outliers`) has not taken it out; a
                half-open endpoint (just re-admitted) takes one request at a time
    not tried   not already tried by this request (a retry goes elsewhere)

When nothing passes, the answer is None: the engine fails fast with 503 + Retry-After
rather than sending to a worker it believes down (health is re-probed every
`health_interval_s`, ejections end on their own).

The picker: the highest weighted sum; ties broken round-robin by a rotating scan start, so
an idle fleet is served in turn, or at random (`routing.ties: random`, for several gateway
processes whose round-robin cursors would otherwise move in step).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from engines.spec import RoutingSpec
from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest, Scorer

__all__ = ["Router", "usable"]

_NO_REQUEST = RoutingRequest()
_NONE: tuple[Endpoint, ...] = ()


def usable(e: Endpoint) -> bool:
    """The healthy and not-ejected filters for one endpoint."""
    return e.healthy and not e.ejected and not (e.half_open and e.outstanding)


class Router:
    """Picks one endpoint per attempt. `scorers` are (scorer, weight) pairs."""

    def __init__(self, scorers: Sequence[tuple[Scorer, float]], ties: str = "round_robin") -> None:
        self.scorers = list(scorers)
        self._rr = -1
        self.random_ties = ties == "random"
        # The request keys some scorer needs (the engine computes only these).
        self.needs = frozenset(getattr(s, "needs", "") for s, _w in self.scorers) - {""}

    @classmethod
    def from_spec(cls, routing: RoutingSpec, table: dict[str, type[Scorer]]) -> Router:
        scorers: list[tuple[Scorer, float]] = []
        for name, weight in routing.scorers.items():
            scorer = table[name]()
            configure = getattr(scorer, "configure", None)
            if configure is not None:
                configure(routing)
            scorers.append((scorer, weight))
        return cls(scorers, routing.ties)

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        request: RoutingRequest | None = None,
        exclude: Sequence[Endpoint] = _NONE,
    ) -> Endpoint | None:
        n = len(endpoints)
        if n == 1:
            e = endpoints[0]
            return e if usable(e) and e not in exclude else None
        if n == 0:
            return None
        # Rotate the order so that ties go round-robin.
        start = self._rr = (self._rr + 1) % n
        candidates = [
            e
            for e in (*endpoints[start:], *endpoints[:start])
            if e.healthy and not e.ejected and not (e.half_open and e.outstanding)
        ]
        if exclude:
            candidates = [e for e in candidates if e not in exclude]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        req = request or _NO_REQUEST
        scorers = self.scorers
        if len(scorers) == 1:
            totals = scorers[0][0].score(candidates, req)  # one weight scales nothing
        else:
            columns = [[w * x for x in scorer.score(candidates, req)] for scorer, w in scorers if w]
            totals = [sum(t) for t in zip(*columns, strict=True)]
        # The first highest: the scan start rotates, so exact ties go round-robin.
        top = max(totals)
        if self.random_ties:
            tied = [i for i, t in enumerate(totals) if t >= top - 1e-12]
            return candidates[random.choice(tied)]
        return candidates[totals.index(top)]
