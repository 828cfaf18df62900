"""Consistent hashing with two load bounds, shared by the affinity scorers.

Owns the ring (40 virtual points per endpoint, placed by a stable hash of its URL, so every
gateway process and replica agrees on it), the load bounds and where a key spills. A key
goes to the first endpoint clockwise from its hash — its owner — while the owner is under
both bounds (`load_factor` = c, m candidates):

    in flight   outstanding(owner) < ceil(c × (total outstanding + 1) / m)
                (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
                Loads", 2018: a hot key fills its worker up to the bound, not beyond)
    share       picks(owner) < c × max(least picks, mean picks / c, 24) + 1
                (picks: the endpoints this ring chose recently, halved every 256 × m
                picks, so about the last 256 × m requests)

Otherwise the key spills: to the endpoint it spilled to last time if that one is under
both bounds (so a spilled key's prompts warm one more cache, not every cache), else to the
endpoint with the fewest recent picks that is under the in-flight bound, which then is
the key's spill target.

Why the share bound: with few keys the ring's ownership is uneven whatever the virtual
nodes (16 keys on 4 workers fell from 3/4/4/5 to 0/3/5/8 over the 20 layouts of
`tests/engines/upstream/test_routing.py`), and the in-flight bound acts only while workers
are busy: at moderate load the owners of many keys took up to 2.6 × the requests of the
owner of few (bench/routing.py --layouts, docs/benchmarks.md). The share bound caps a
worker's recent picks at c × the least-picked worker's (the mean / c and the floor of 24
keep a worker that just joined, or a fleet just started, from drawing every key at once).
Its tolerance is the load factor itself: half of it (1.125 at the default) kept the
balance at 1.12 but the prefix-cache hit rate at 64 %, the full 1.25 gave 1.25 and
67.5 %, the ring's own rate (bench/routing.py --layouts 8, docs/benchmarks.md).
Spilling to the ring's next node (the paper's walk) or bounding against the mean rather
than the least busy left 1.3–2.2 in some layouts (docs/benchmarks.md).

Replicas agree on owners; which key spills where is each router's own (its picks), so
with several gateway replicas a spilled key may warm one cache per replica. Does not own
what the key is (each scorer) or any send.

Rings are cached per candidate set (the set changes only when a worker is filtered out),
keyed by (count, sum of the endpoints' ids): measured 5 µs for a frozenset of 16 ids on
the loaded 2-core dev box against ~1 µs for the sum, on a path with a 50 µs budget.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect
from collections.abc import Sequence

from engines.upstream.endpoints import Endpoint

__all__ = ["HashRing", "stable_hash"]

_VNODES = 40
# Picks are halved every _WINDOW × (candidates) picks: the share bound looks at about the
# last that many requests.
_WINDOW = 256
# The share bound never falls below c × _FLOOR + 1 picks (a fresh fleet keeps affinity).
_FLOOR = 24.0
# Spill targets remembered per key (cleared when full; sessions make many keys).
_SPILLS = 4096


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class HashRing:
    """Key → endpoint by consistent hashing with bounded load and share."""

    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = load_factor
        self._rings: dict[tuple[int, int], tuple[list[int], list[Endpoint]]] = {}
        # Recent picks per endpoint (decayed), and each spilled key's last spill target.
        self._picks: dict[Endpoint, float] = {}
        self._total = 0.0  # the sum of _picks
        self._count = 0
        self._spills: dict[int, Endpoint] = {}
        # Whether the last `owner` call passed the key on (its owner was over a bound):
        # the routing decision's reason `bounded_load_overflow`.
        self.spilled = False

    def _ring(self, candidates: Sequence[Endpoint]) -> tuple[list[int], list[Endpoint]]:
        key = (len(candidates), sum(map(id, candidates)))
        ring = self._rings.get(key)
        if ring is None:
            points = sorted(
                (stable_hash(f"{e.url}#{v}"), i)
                for i, e in enumerate(candidates)
                for v in range(_VNODES)
            )
            ring = ([p for p, _ in points], [candidates[i] for _, i in points])
            if len(self._rings) >= 64:
                self._rings.clear()
            self._rings[key] = ring
            for e in candidates:  # every candidate has a count: `owner` reads them in C
                self._picks.setdefault(e, 0.0)
        return ring

    def owner(self, key: int, candidates: Sequence[Endpoint]) -> Endpoint:
        """The endpoint for `key` now (see the module docstring); counts it as picked."""
        points, owners = self._ring(candidates)
        e = owners[bisect(points, key) % len(points)]
        picks = self._picks
        get = picks.get
        m = len(candidates)
        c = self.load_factor
        h = c  # the share's tolerance (module docstring)
        # The common case first, exact and without a pass over the candidates: an idle
        # owner below the mean (every endpoint a candidate: the mean is the total's) is
        # under both bounds, the share bound being at least max(mean, h × floor) + 1.
        if (
            not e.outstanding
            and len(picks) == m
            and picks[e] < max(self._total / m, h * _FLOOR) + 1.0
        ):
            self.spilled = False
            self._picked(e, m)
            return e
        counts = list(map(picks.__getitem__, candidates))
        least = min(counts)
        share = h * max(least, sum(counts) / (m * h), _FLOOR) + 1.0
        # The common case first: an idle owner is under any in-flight bound (no sum).
        if e.outstanding:
            total = sum([x.outstanding for x in candidates])
            busy = math.ceil(c * (total + 1) / m)
        else:
            busy = 1 << 62
        if get(e, 0.0) < share and e.outstanding < busy:
            self.spilled = False
        else:
            self.spilled = True
            if not e.outstanding:  # the in-flight bound was skipped above
                total = sum([x.outstanding for x in candidates])
                busy = math.ceil(c * (total + 1) / m)
            spills = self._spills
            last = spills.get(key)
            if (
                last is not None
                and last is not e
                and last in candidates
                and get(last, 0.0) < share
                and last.outstanding < busy
            ):
                e = last
            else:
                # Fewest recent picks among those under the in-flight bound (the least
                # outstanding always is: the bound exceeds the mean); the least picked
                # of all first, found in C.
                least_picked = candidates[counts.index(least)]
                if least_picked.outstanding < busy:
                    e = least_picked
                else:
                    best = None
                    for x, n in zip(candidates, counts, strict=True):
                        if x.outstanding < busy and (best is None or n < best[0]):
                            best = (n, x)
                    if best is not None:
                        e = best[1]
                if len(spills) >= _SPILLS:
                    spills.clear()
                spills[key] = e
        self._picked(e, m)
        return e

    def _picked(self, e: Endpoint, m: int) -> None:
        """Count one pick of `e`; halve every count each _WINDOW × m picks."""
        picks = self._picks
        picks[e] = picks.get(e, 0.0) + 1.0
        self._total += 1.0
        self._count += 1
        if self._count >= _WINDOW * m:
            self._count = 0
            self._total *= 0.5
            for x in picks:
                picks[x] *= 0.5
