"""The routing plugin contract: what a scorer sees and returns.

Owns `RoutingRequest` (what a policy may know about the request: adapter, and later the
prompt's prefix or a session key) and the `Scorer` Protocol. Does not own any policy.
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


class Scorer(Protocol):
    """Scores every candidate in [0, 1]; higher is better. Must be cheap: it runs on every
    request (the router's p99 budget is 50 µs for 16 workers)."""

    name: str

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]: ...
