"""The routing plugin contract: what a scorer sees and returns.

Owns `RoutingRequest` (what a policy may know about the request: the adapter, the hash of
the prompt's prefix, the hash of its session key, the keys of its KV-cache blocks; the
engine computes each only when an enabled scorer `needs` it) and the `Scorer` Protocol.
Does not own any policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engines.upstream.endpoints import Endpoint

__all__ = ["RoutingRequest", "Scorer"]


@dataclass(slots=True, frozen=True)
class RoutingRequest:
    """The request as routing sees it."""

    adapter: str | None = None
    # Stable 64-bit hashes (`hashring.stable_hash`), None when no scorer needs them.
    prefix: int | None = None
    session: int | None = None
    # The gateway's keys of the prompt's full KV-cache blocks, in order (`kv_blocks`),
    # None unless a scorer needs "tokens" (`kv_cache_hit`).
    blocks: list[int] | None = None


class Scorer(Protocol):
    """Scores every candidate in [0, 1]; higher is better. Must be cheap: it runs on every
    request (the router's p99 budget is 50 µs for 16 workers)."""

    name: str
    # Optional: `needs` ("prefix" | "session") asks the engine to compute that key, "tokens"
    # the prompt's block keys (the scorer computes them: `kv_cache_hit`), "load"
    # to scrape the workers' /metrics at every health probe (`Endpoint.load`);
    # `configure(routing: RoutingSpec)` receives the model's `routing:` settings.

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]: ...
