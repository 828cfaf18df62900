"""The router: filter → weighted scorers → pick, for one model's endpoints, and why.

Owns the filters, the picker and the count of routing decisions by reason; does not own
any scorer's formula (one module each in this package). The filters, in order, each one
attribute read per endpoint:

    healthy     the last health probe (or connect attempt) succeeded
    not ejected outlier ejection (`engines.upstream.outliers`) has not taken it out; a
                half-open endpoint (just re-admitted) takes one request at a time
    not tried   not already tried by this request (a retry goes elsewhere)

When nothing passes, the answer is None: the engine fails fast with 503 + Retry-After
rather than sending to a worker it believes down (health is re-probed every
`health_interval_s`, ejections end on their own) — unless panic routing applies: when at
least the engine's `options.panic_threshold` share of the healthy endpoints is ejected
(by default: all of them), the engine asks `pick_panic`, which drops the ejection filters
and keeps the healthy and not-tried ones (Envoy's panic threshold: a lone worker that
returned a few 5xx keeps serving instead of minutes of 503).

The picker: the highest weighted sum; ties broken round-robin (a rotating counter picks
which of the tied, so an idle fleet is served in turn), or at random (`routing.ties:
random`, for several gateway processes whose round-robin cursors would otherwise move in
step).

Reasons (`Router.decisions`, exported as `gateway_routing_decisions{model,reason}`): which
rule decided each pick.

    only_choice   one endpoint passed the filters
    retry         a retry: the endpoints already tried were excluded
    panic         panic routing: ejected endpoints were candidates too
    tie           every scorer rated the winner and the runner-up alike; the tie-break chose
    <scorer's>    the weighted scorer that contributed most to the winner's lead over the
                  runner-up: `least_loaded` (least_outstanding, queue_depth, kv_cache),
                  `prefix_affinity` / `session_affinity` (or `bounded_load_overflow` when
                  the key's owner was over a load bound and the key spilled), `lora_held` /
                  `lora_placed` (the winner holds the adapter / will load it)

The dominant one-hot short cut: a scorer that rates exactly one endpoint 1 and the rest 0
(`owner()`: prefix and session affinity) and whose weight exceeds the sum of all the
others' (each scorer is in [0, 1]) decides alone: its owner's total is at least its weight
and every other total at most the others' sum. The router then asks it for the owner and
computes no other scorer; with no key it falls back to the full sum. Measured on this
project's 2-core box (bench/routing.py --pick-only, 16 endpoints): the weighted-sum path
for `prefix_affinity: 2, least_outstanding: 1` took 23–39 µs p50 and 70–140 µs p99
(the box's own noise: a plain 25 µs loop has p99 1.6× its p50), above the 50 µs budget.

Measured (bench/routing.py --pick-only, 16 endpoints, docs/benchmarks.md): the reason costs
one `count` over the totals and, with several scorers, one pass for the runner-up; the
weighted sum is one comprehension over the scorers' columns with the weights applied once,
rather than a list per scorer and a `zip(*columns)`; ties rotate by a counter over the tied
rather than over a rotated copy of the endpoint list.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from engines.spec import RoutingSpec
from engines.upstream.endpoints import Endpoint
from engines.upstream.routing.base import RoutingRequest, Scorer

__all__ = ["Router", "usable"]

_NO_REQUEST = RoutingRequest()
_NONE: tuple[Endpoint, ...] = ()

# The reason a scorer gives when it decided, unless it has a `why(winner, request)`.
_DEFAULT_REASON = "least_loaded"

Why = Callable[[Endpoint, RoutingRequest], str]


def usable(e: Endpoint) -> bool:
    """The healthy and not-ejected filters for one endpoint."""
    return e.healthy and not e.ejected and not (e.half_open and e.outstanding)


def _reason_of(scorer: Scorer) -> str | Why:
    """The scorer's `why(winner, request)`, else its constant `reason`."""
    why: Why | None = getattr(scorer, "why", None)
    if why is not None:
        return why
    reason: str = getattr(scorer, "reason", _DEFAULT_REASON)
    return reason


class Router:
    """Picks one endpoint per attempt. `scorers` are (scorer, weight) pairs; a zero weight
    turns a scorer off."""

    def __init__(self, scorers: Sequence[tuple[Scorer, float]], ties: str = "round_robin") -> None:
        self.scorers = [(s, float(w)) for s, w in scorers if w]
        self._score = [s.score for s, _w in self.scorers]
        self._weights = [w for _s, w in self.scorers]
        self._why = [_reason_of(s) for s, _w in self.scorers]
        self._rr = -1
        self.random_ties = ties == "random"
        # The request keys some scorer needs (the engine computes only these).
        self.needs = frozenset(getattr(s, "needs", "") for s, _w in self.scorers) - {""}
        # Decisions so far by reason (monotonic; read at scrape time), and the last pick's
        # (read right after `pick` by a traced request: one store per pick).
        self.decisions: dict[str, int] = {}
        self.last = ""
        # A one-hot scorer that outweighs all others together decides alone (see above).
        self._dominant: tuple[Callable[..., Endpoint | None], str | Why] | None = None
        total = sum(self._weights)
        for (scorer, weight), why in zip(self.scorers, self._why, strict=True):
            owner = getattr(scorer, "owner", None)
            if owner is not None and len(self.scorers) > 1 and weight > total - weight:
                self._dominant = (owner, why)

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

    def _count(self, reason: str) -> None:
        self.last = reason
        d = self.decisions
        d[reason] = d.get(reason, 0) + 1

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        request: RoutingRequest | None = None,
        exclude: Sequence[Endpoint] = _NONE,
    ) -> Endpoint | None:
        if exclude:
            candidates = [
                e
                for e in endpoints
                if e.healthy
                and not e.ejected
                and not (e.half_open and e.outstanding)
                and e not in exclude
            ]
        elif len(endpoints) == 1:
            e = endpoints[0]
            if not usable(e):
                return None
            self._count("only_choice")
            return e
        else:
            candidates = [
                e
                for e in endpoints
                if e.healthy and not e.ejected and not (e.half_open and e.outstanding)
            ]
        n = len(candidates)
        if n <= 1:
            if not n:
                return None
            self._count("retry" if exclude else "only_choice")
            return candidates[0]
        return self._choose(candidates, request or _NO_REQUEST, exclude)

    def pick_panic(
        self,
        endpoints: Sequence[Endpoint],
        request: RoutingRequest | None = None,
        exclude: Sequence[Endpoint] = _NONE,
    ) -> Endpoint | None:
        """Panic routing (the engine's `options.panic_threshold`, Envoy's panic mode): the
        same scorers and picker over every healthy endpoint not yet tried, ejected and
        busy half-open ones included. Counted as reason `panic`."""
        candidates = [e for e in endpoints if e.healthy and e not in exclude]
        if len(candidates) <= 1:
            if not candidates:
                return None
            self._count("panic")
            return candidates[0]
        return self._choose(candidates, request or _NO_REQUEST, exclude, "panic")

    def _choose(
        self,
        candidates: list[Endpoint],
        req: RoutingRequest,
        exclude: Sequence[Endpoint],
        panic: str | None = None,
    ) -> Endpoint:
        """The weighted-sum pick among ≥ 2 candidates, counted by the rule that decided
        (`panic`: that reason instead)."""
        if self._dominant is not None:
            owner, why = self._dominant
            winner = owner(candidates, req)
            if winner is not None:
                if panic:
                    self._count(panic)
                elif exclude:
                    self._count("retry")
                else:
                    self._count(why if isinstance(why, str) else why(winner, req))
                return winner
        score = self._score
        if len(score) == 1:
            totals = score[0](candidates, req)  # one weight scales nothing
            columns = [totals]
        else:
            columns = [f(candidates, req) for f in score]
            w = self._weights
            if len(columns) == 2:
                a, b = columns
                wa, wb = w
                totals = [wa * x + wb * y for x, y in zip(a, b, strict=True)]
            else:
                totals = [w[0] * x for x in columns[0]]
                for wk, ck in zip(w[1:], columns[1:], strict=True):
                    totals = [t + wk * x for t, x in zip(totals, ck, strict=True)]
        top = max(totals)
        ties = totals.count(top)
        if ties == 1:
            i = totals.index(top)
        elif self.random_ties:
            i = random.choice([k for k, t in enumerate(totals) if t == top])
        else:
            # Round-robin among the tied: the m-th of them, m from a rotating counter (a
            # few `index` calls in C; no exception, no list of the tied).
            self._rr += 1
            i = totals.index(top)
            for _ in range(self._rr % ties):
                i = totals.index(top, i + 1)
        winner = candidates[i]
        if panic:
            reason = panic
        elif exclude:
            reason = "retry"
        elif ties > 1:
            reason = "tie"
        else:
            decider = self._why[0] if len(score) == 1 else self._decider(columns, totals, i)
            reason = decider if isinstance(decider, str) else decider(winner, req)
        self.last = reason
        d = self.decisions
        d[reason] = d.get(reason, 0) + 1
        return winner

    def _decider(self, columns: list[list[float]], totals: list[float], i: int) -> str | Why:
        """The reason (or its `why`) of the scorer that contributed most to the winner's
        lead over the runner-up (the winner is the only highest: no ties here)."""
        why = self._why
        top = totals[i]
        totals[i] = -1.0  # scores are ≥ 0: the runner-up is the next highest
        j = totals.index(max(totals))
        totals[i] = top
        w = self._weights
        best, lead = 0, -1.0
        for k, col in enumerate(columns):
            d = w[k] * (col[i] - col[j])
            if d > lead:
                best, lead = k, d
        return why[best]
