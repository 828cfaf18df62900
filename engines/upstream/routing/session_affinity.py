"""Scorer `session_affinity`: keep one conversation (session) on one worker, so each turn
finds the previous turns in that worker's prefix cache.

    key      = stable hash of the session: the header `routing.session_header` (default
               `x-session-id`), else the body's `user` field
    owner    = consistent-hash owner of key, under two load bounds (`hashring`)
    score(e) = 1 if e is owner else 0          (0 for all when the request has no session)

Consistent hashing moves only the sessions of a worker that leaves; the bounds stop a
burst of one session's requests from overloading its worker (a spilled session keeps its
spill target while that one is under the bounds).
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.spec import RoutingSpec
from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest
from engines.upstream.routing.hashring import HashRing


class SessionAffinityScorer:
    name = "session_affinity"
    needs = "session"

    def __init__(self) -> None:
        self.ring = HashRing()

    def configure(self, routing: RoutingSpec) -> None:
        self.ring.load_factor = routing.load_factor

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        if request.session is None:
            return [0.0] * len(candidates)
        owner = self.ring.owner(request.session, candidates)
        out = [0.0] * len(candidates)
        out[candidates.index(owner)] = 1.0
        return out

    def owner(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> Endpoint | None:
        """The one endpoint scored 1 (None without a session): the router's short cut when
        this scorer outweighs all others together."""
        if request.session is None:
            return None
        return self.ring.owner(request.session, candidates)

    def why(self, winner: Endpoint, request: RoutingRequest) -> str:
        """The routing decision's reason when this scorer decided."""
        return "bounded_load_overflow" if self.ring.spilled else "session_affinity"
