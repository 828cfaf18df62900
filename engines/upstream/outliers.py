"""Failure accounting for one model's workers: the retry budget and outlier ejection.

Owns `RetryBudget` (how many retries the model may spend) and `Outliers` (consecutive
failures per worker → ejection with a growing ejection time → half-open re-admission).
Does not own when an attempt is retried or what counts as a failure (the engine's send
path classifies answers: connect errors, resets, timeouts and 5xx that are not
backpressure are failures; a 429 or a queue-full 503 never is) nor the health probes that
re-admit (`engines.upstream.health`).

The budget is Finagle's / Envoy's idea in its simplest rate form: within a window of
`window_s`, retries ≤ max(minimum, ratio × requests). Under a sustained failure every
request beyond the first few pays at most `ratio` extra attempts, so upstream attempts ÷
requests stays ≤ 1 + ratio; a sporadic failure is always retried (the minimum). The window
is rolled by the health loop, so the hot path never reads the clock for it.
"""

from __future__ import annotations

from engines.upstream.endpoints import Endpoint

__all__ = ["Outliers", "RetryBudget"]


class RetryBudget:
    """Retries ≤ max(minimum, ratio × requests) per window; `roll()` starts a new window."""

    __slots__ = ("exhausted", "minimum", "ratio", "requests", "retries", "retries_total")

    def __init__(self, ratio: float, minimum: int) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.requests = 0
        self.retries = 0
        # Totals for the metrics (never reset).
        self.retries_total = 0
        self.exhausted = 0

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        if self.retries < max(self.minimum, self.ratio * self.requests):
            self.retries += 1
            self.retries_total += 1
            return True
        self.exhausted += 1
        return False

    def roll(self) -> None:
        self.requests = self.retries = 0


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
