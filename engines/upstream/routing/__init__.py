"""Routing: which worker of a model gets a request, as filters → weighted scorers → picker.

    filters    drop endpoints that cannot take the request (unhealthy, ejected, half-open
               and busy, already tried by this request); when nothing passes, the engine
               fails fast with 503 + Retry-After
    scorers    each gives every remaining endpoint a score in [0, 1] (higher is better)
    picker     the endpoint with the highest weighted sum; ties broken round-robin or at
               random (`routing.ties`)

A policy is chosen per model in models.yaml under `routing:` (`engines.spec.RoutingSpec`);
the default, `scorers: {least_outstanding: 1}`, is the gateway's original rule (fewest
outstanding requests among healthy endpoints, rotating start for ties).

Adding a policy: write one scorer module here (a class with `name` and
`score(candidates, request) -> list[float]`, its formula in the docstring), add one line to
`SCORERS` below, and name it with a weight in models.yaml.

This package owns decisions only; it never sends anything and never imports the gateway.
"""

from __future__ import annotations

from engines.upstream.routing.base import RoutingRequest, Scorer
from engines.upstream.routing.kv_cache import KVCacheScorer
from engines.upstream.routing.kv_cache_hit import KVCacheHitScorer
from engines.upstream.routing.least_outstanding import LeastOutstandingScorer
from engines.upstream.routing.lora_affinity import LoraAffinityScorer
from engines.upstream.routing.prefix_affinity import PrefixAffinityScorer
from engines.upstream.routing.queue_depth import QueueDepthScorer
from engines.upstream.routing.router import Router
from engines.upstream.routing.session_affinity import SessionAffinityScorer

# The one table of scorer names models.yaml may use.
SCORERS: dict[str, type[Scorer]] = {
    "least_outstanding": LeastOutstandingScorer,
    "queue_depth": QueueDepthScorer,
    "kv_cache": KVCacheScorer,
    "kv_cache_hit": KVCacheHitScorer,
    "prefix_affinity": PrefixAffinityScorer,
    "session_affinity": SessionAffinityScorer,
    "lora_affinity": LoraAffinityScorer,
}

__all__ = ["SCORERS", "Router", "RoutingRequest", "Scorer"]
