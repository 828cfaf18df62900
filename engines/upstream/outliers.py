"""Failure accounting for one model's workers: the retry budget and outlier ejection.

Owns `RetryBudget` (how many retries the model may spend) and `Outliers` (consecutive
failures per worker → ejection with a growing ejection time → half-open re-admission).
Does not own when an attempt is retried or what counts as a failure (the engine's send
path classifies answers: connect errors, resets, timeouts and 5xx that are not
backpressure are failures; a 429 or a queue-full 503 never is) nor the health probes that
re-admit (`engines.upstream.health`).

The budget is Finagle's `RetryBudget`: a token bucket whose tokens live `ttl_s`. Each
request deposits `ratio` of a token, each retry withdraws one, and `minimum` retries per
`ttl_s` are always allowed (a reserve; what it lends is paid back as its withdrawals
expire). So in any `ttl_s`, retries ≤ minimum + ratio × requests: under a sustained
failure upstream attempts ÷ requests stays ≤ 1 + ratio (plus the reserve), and a sporadic
failure is always retried. Unlike the tumbling window it replaces (retries ≤ max(minimum,
ratio × requests in the current 10 s window), both counts reset each window), nothing
collapses at a window's start: a burst of failures at a fault draws on every request of
the last `ttl_s`, so a worker that starts resetting connections under load has its
requests retried on the others. The hot path only counts requests (`requests += 1`); they
are deposited, with the time, when the health loop calls `roll()` (every probe round) or
a retry is asked for, which is the one place that reads the clock.
"""

from __future__ import annotations

import time
from collections import deque

from engines.upstream.endpoints import Endpoint

__all__ = ["Outliers", "RetryBudget"]


class RetryBudget:
    """Retries ≤ minimum + ratio × requests within any `ttl_s` (a token bucket with a
    time-to-live). `roll()` deposits the requests counted since the last call."""

    __slots__ = (
        "_balance",
        "_log",
        "exhausted",
        "minimum",
        "ratio",
        "requests",
        "retries_total",
        "ttl_s",
    )

    def __init__(self, ratio: float, minimum: int, ttl_s: float = 10.0) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.ttl_s = ttl_s
        # Requests since the last deposit (the only thing the hot path touches).
        self.requests = 0
        # (time, +deposit or −withdrawal) within the last ttl_s, oldest first, and their sum.
        self._log: deque[tuple[float, float]] = deque()
        self._balance = 0.0
        # Totals for the metrics (never reset).
        self.retries_total = 0
        self.exhausted = 0

    def roll(self, now: float | None = None) -> None:
        """Deposit the requests counted since the last call and let expired entries go."""
        if now is None:
            now = time.monotonic()
        log = self._log
        if self.requests:
            amount = self.ratio * self.requests
            self.requests = 0
            log.append((now, amount))
            self._balance += amount
        horizon = now - self.ttl_s
        while log and log[0][0] <= horizon:
            self._balance -= log.popleft()[1]
        if not log:
            self._balance = 0.0  # no float drift across idle periods

    def available(self, now: float | None = None) -> float:
        """Retries the budget would allow now."""
        self.roll(now)
        return self.minimum + self._balance

    def try_retry(self, now: float | None = None) -> bool:
        """Spend one retry if the budget allows it."""
        if now is None:
            now = time.monotonic()
        if self.available(now) >= 1.0 - 1e-9:
            self._log.append((now, -1.0))
            self._balance -= 1.0
            self.retries_total += 1
            return True
        self.exhausted += 1
        return False


class Outliers:
    """Consecutive-failure ejection. Ejection time = base × 2^(ejections in a row − 1),
    capped at `max_s`; a half-open worker's first failure ejects it again (longer), its
    first success ends the streak."""

    __slots__ = ("base_s", "max_s", "threshold")

    def __init__(self, threshold: int, base_s: float, max_s: float) -> None:
        self.threshold = threshold
        self.base_s = base_s
        self.max_s = max_s

    def success(self, ep: Endpoint) -> None:
        ep.failures = 0
        if ep.half_open:
            ep.half_open = False
            ep.eject_streak = 0

    def failure(self, ep: Endpoint, why: str, now: float) -> bool:
        """Count one failure; True when it ejected the worker."""
        ep.failures += 1
        ep.last_error = why
        if ep.ejected:
            return False
        if ep.half_open or ep.failures >= self.threshold:
            self.eject(ep, now)
            return True
        return False

    def eject(self, ep: Endpoint, now: float) -> None:
        ep.eject_streak += 1
        ep.ejections += 1
        ep.ejected = True
        ep.half_open = False
        ep.ejected_until = now + min(self.max_s, self.base_s * 2 ** (ep.eject_streak - 1))

    @staticmethod
    def due(ep: Endpoint, now: float) -> bool:
        """Ejected and its time is up: ready for a half-open probe."""
        return ep.ejected and now >= ep.ejected_until

    @staticmethod
    def readmit(ep: Endpoint) -> None:
        ep.ejected = False
        ep.half_open = True
        ep.failures = 0
