"""Scorer `lora_affinity`: send an adapter's requests to a worker that already holds it;
otherwise to one with a free adapter slot, so a load evicts nothing. Turning it on switches
the model's adapters to on-demand placement (`engines.upstream.adapters`): the picked
worker loads the adapter first if it lacks it, evicting its least recently used one when
full.

    score(e) = 1                                   no adapter asked, or e holds it
               0.5 × free_slots(e) / slots(e)      otherwise (0 when e must evict)

Weigh it above `least_outstanding` (e.g. `lora_affinity: 2, least_outstanding: 1`) so a
holder wins unless it is the busiest worker and another has every slot free.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest


class LoraAffinityScorer:
    name = "lora_affinity"

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        name = request.adapter
        if name is None:
            return [1.0] * len(candidates)
        out = []
        for e in candidates:
            if name in e.adapters:
                out.append(1.0)
            else:
                slots = e.adapter_slots or 1
                out.append(0.5 * max(0, slots - len(e.adapters)) / slots)
        return out

    def why(self, winner: Endpoint, request: RoutingRequest) -> str:
        """The routing decision's reason when this scorer decided: the winner holds the
        adapter, or will load it."""
        return "lora_held" if request.adapter in winner.adapters else "lora_placed"
