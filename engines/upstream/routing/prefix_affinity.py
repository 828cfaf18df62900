"""Scorer `prefix_affinity`: send prompts that start alike to the same worker, whose
prefix (KV) cache then already holds their common start.

    key      = stable hash of the prompt's first `routing.prefix_chars` characters (chat:
               the messages' text in order; completions: the prompt)
    owner    = consistent-hash owner of key, under two load bounds (`hashring`)
    score(e) = 1 if e is owner else 0

The bounds keep the ring's uneven ownership of few prefixes from becoming uneven load: a
key's worker is passed over while it has more than `load_factor` × the mean outstanding,
or more than `load_factor` × the recent requests of the least busy worker;
the key then spills to its last spill target or the least busy worker (which warms up
too). Combine with `least_outstanding` at a lower weight to break the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.spec import RoutingSpec
from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest
from engines.upstream.routing.hashring import HashRing


class PrefixAffinityScorer:
    name = "prefix_affinity"
    needs = "prefix"

    def __init__(self) -> None:
        self.ring = HashRing()

    def configure(self, routing: RoutingSpec) -> None:
        self.ring.load_factor = routing.load_factor

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        if request.prefix is None:
            return [0.0] * len(candidates)
        owner = self.ring.owner(request.prefix, candidates)
        out = [0.0] * len(candidates)
        out[candidates.index(owner)] = 1.0
        return out

    def owner(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> Endpoint | None:
        """The one endpoint scored 1 (None when the request has no prefix): the router's
        short cut when this scorer outweighs all others together."""
        if request.prefix is None:
            return None
        return self.ring.owner(request.prefix, candidates)

    def why(self, winner: Endpoint, request: RoutingRequest) -> str:
        """The routing decision's reason when this scorer decided."""
        return "bounded_load_overflow" if self.ring.spilled else "prefix_affinity"
