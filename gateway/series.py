"""The status page's live series: the last 15 minutes per model, in 10-second buckets,
kept in the gateway and shared by its front doors.

Owns `Series`: a ring of per-10-second buckets per model, fed once per finished request
(`RequestRecord.finished` → `record`: a few additions and two histogram increments, no
lock, no allocation past a bucket's first request), sampled every `SAMPLE_S` for what is
in flight and queued, published to the state store (`StateStore.map_set`, one field per
front door) every `PUBLISH_S`, and merged — every live front door's buckets added up —
into the JSON the page draws (`snapshot`, served at `GET /status/series`). With the memory
store (one process) the merge is this process's own ring. A front door that stopped
publishing for `STALE_S` is left out, and its field deleted.

A bucket per model: requests, errors (status ≥ 400 but not 499, the client leaving),
429s, prompt and completion tokens, end-to-end and TTFT histograms on log-spaced bounds
(25 % apart: a percentile read from them is within that of the truth), and the most seen
in flight, queued at the gateway (its admission queue) and waiting at the workers (their
own queues, as the engines report them: the same workers seen by every front door, so
merged by max, not summed). Percentiles are computed after the merge, never averaged.

Does not own the Prometheus metrics (`gateway.metrics`, cumulative since start, for
Prometheus and Grafana) nor drawing (`gateway/ui/app.js`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from engines.base import Usage

if TYPE_CHECKING:
    from gateway.state_store import StateStore

log = logging.getLogger("gateway.series")

BUCKET_S = 10
BUCKETS = 90  # 15 minutes
SAMPLE_S = 2.0
PUBLISH_S = 5.0
STALE_S = 30.0
MAP = "status-series"
# Histogram bounds in seconds: 1 ms × 1.25^k up to 15 minutes.
BOUNDS = [0.001 * 1.25**k for k in range(62)]

# One bucket of one model: the counters, then the two sparse histograms, then the maxima.
N, ERRORS, LIMITED, PROMPT, COMPLETION, E2E, TTFT, IN_FLIGHT, QUEUED, WAITING = range(10)


def _bucket() -> list[Any]:
    return [0, 0, 0, 0, 0, {}, {}, 0, 0, 0]


def quantile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile of a sparse histogram (bucket index → count): the bucket's upper
    bound, interpolated linearly inside the bucket."""
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for i in sorted(hist):
        n = hist[i]
        if seen + n >= rank:
            hi = BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1]
            lo = BOUNDS[i - 1] if 0 < i <= len(BOUNDS) else (0.0 if i == 0 else hi)
            return lo + (hi - lo) * ((rank - seen) / n)
        seen += n
    return BOUNDS[-1]


class Series:
    """The ring of one process, and the merge of every front door's."""

    def __init__(
        self,
        sample: Callable[[], dict[str, tuple[int, int, int]]],
        store: Callable[[], StateStore] | None = None,
    ):
        # model → (in flight, queued at the gateway, waiting at the workers), read every
        # SAMPLE_S (`gateway.state` builds it from the metrics and the engines).
        self._sample = sample
        self._store = store
        self.door = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self._ring: dict[int, dict[str, list[Any]]] = {}
        self._slot = -1
        self._now: dict[str, list[Any]] = {}
        self._task: asyncio.Task[None] | None = None

    # -- the request path ----------------------------------------------------------------

    def record(
        self, model: str, status: int, duration: float, ttft: float | None, usage: Usage | None
    ) -> None:
        """One finished request."""
        slot = int(time.time()) // BUCKET_S
        if slot != self._slot:
            self._roll(slot)
        b = self._now.get(model)
        if b is None:
            b = self._now[model] = _bucket()
        b[N] += 1
        if status >= 400 and status != 499:
            b[ERRORS] += 1
            if status == 429:
                b[LIMITED] += 1
        if usage is not None:
            b[PROMPT] += usage.prompt_tokens
            b[COMPLETION] += usage.completion_tokens
        h = b[E2E]
        i = bisect_left(BOUNDS, duration)
        h[i] = h.get(i, 0) + 1
        if ttft is not None:
            h = b[TTFT]
            i = bisect_left(BOUNDS, ttft)
            h[i] = h.get(i, 0) + 1

    def _roll(self, slot: int) -> None:
        self._slot = slot
        self._now = self._ring.setdefault(slot, {})
        for old in [s for s in self._ring if s <= slot - BUCKETS]:
            del self._ring[old]

    # -- sampling and sharing ------------------------------------------------------------

    def sample(self) -> None:
        """Note what is in flight and queued now (the bucket keeps the most seen)."""
        slot = int(time.time()) // BUCKET_S
        if slot != self._slot:
            self._roll(slot)
        for model, (in_flight, queued, waiting) in self._sample().items():
            b = self._now.get(model)
            if b is None:
                if not (in_flight or queued or waiting):
                    continue
                b = self._now[model] = _bucket()
            b[IN_FLIGHT] = max(b[IN_FLIGHT], in_flight)
            b[QUEUED] = max(b[QUEUED], queued)
            b[WAITING] = max(b[WAITING], waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._shared():
            with contextlib.suppress(Exception):
                await self._store_now().map_delete(MAP, self.door)

    def _shared(self) -> bool:
        return self._store is not None and self._store().name != "memory"

    def _store_now(self) -> StateStore:
        assert self._store is not None
        return self._store()

    async def _run(self) -> None:
        published = warned = 0.0
        while True:
            await asyncio.sleep(SAMPLE_S)
            try:
                self.sample()
                now = time.monotonic()
                if self._shared() and now - published >= PUBLISH_S:
                    published = now
                    await self._store_now().map_set(MAP, self.door, self._dump())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store away: the page shows this door's own
                if time.monotonic() - warned > 60:  # one line a minute at most
                    warned = time.monotonic()
                    log.warning("series: not published to the state store: %s", e)

    def _dump(self) -> str:
        ring = {str(s): m for s, m in self._ring.items()}
        # The histograms' keys are bucket indexes (ints): written as strings.
        return orjson.dumps(
            {"at": time.time(), "ring": ring}, option=orjson.OPT_NON_STR_KEYS
        ).decode()

    async def rings(self) -> list[dict[int, dict[str, list[Any]]]]:
        """Every live front door's ring: this one's own, and the others' from the store."""
        rings = [self._ring]
        if not self._shared():
            return rings
        store = self._store_now()
        try:
            fields = await store.map_all(MAP)
        except Exception as e:
            log.debug("series: others not read: %s", e)
            return rings
        now = time.time()
        for door, raw in fields.items():
            if door == self.door:
                continue
            try:
                data = orjson.loads(raw)
                at = float(data["at"])
                ring = {int(s): m for s, m in data["ring"].items()}
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if now - at > STALE_S:
                with contextlib.suppress(Exception):
                    await store.map_delete(MAP, door)
                continue
            rings.append(ring)
        return rings

    async def snapshot(self) -> dict[str, Any]:
        """The merged series, per model and for all models together: one point per bucket,
        oldest first, the current (partial) bucket last."""
        rings = await self.rings()
        slot = int(time.time()) // BUCKET_S
        slots = range(slot - BUCKETS + 1, slot + 1)
        merged: dict[str, dict[int, list[Any]]] = {}
        for ring in rings:
            for s, models in ring.items():
                if s < slots.start:
                    continue
                for model, b in models.items():
                    _merge(merged.setdefault(model, {}).setdefault(s, _bucket()), b)
        everything: dict[int, list[Any]] = {}
        for per_slot in merged.values():
            for s, b in per_slot.items():
                _merge(everything.setdefault(s, _bucket()), b, waiting_sum=True)
        per_model = {m: _points(ps, slots, slot) for m, ps in sorted(merged.items())}
        return {
            "bucket_s": BUCKET_S,
            "now": time.time(),
            "start": slots.start * BUCKET_S,
            "fronts": len(rings),
            "all": _points(everything, slots, slot),
            "models": per_model,
        }


def _merge(into: list[Any], b: list[Any], waiting_sum: bool = False) -> None:
    for k in (N, ERRORS, LIMITED, PROMPT, COMPLETION, IN_FLIGHT, QUEUED):
        into[k] += b[k]
    # The workers' own queues: the same workers seen by every front door (max), but
    # different models' workers add up.
    into[WAITING] = into[WAITING] + b[WAITING] if waiting_sum else max(into[WAITING], b[WAITING])
    for k in (E2E, TTFT):
        h = into[k]
        for i, n in b[k].items():
            h[int(i)] = h.get(int(i), 0) + n


def _points(per_slot: dict[int, list[Any]], slots: range, current: int) -> dict[str, Any]:
    """Columns of the chart: per bucket, rates per second and percentiles in seconds."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "requests",
            "requests_s",
            "errors_s",
            "rate_limited_s",
            "prompt_tokens_s",
            "completion_tokens_s",
            "e2e_p50",
            "e2e_p95",
            "e2e_p99",
            "ttft_p50",
            "ttft_p95",
            "ttft_p99",
            "in_flight",
            "queued",
            "waiting",
        )
    }
    now = time.time()
    for s in slots:
        b = per_slot.get(s)
        # The current bucket is partial: its rate is over the seconds it has had.
        span = BUCKET_S if s != current else max(1.0, now - s * BUCKET_S)
        if b is None:
            for k, col in cols.items():
                col.append(None if "_p" in k else 0)
            continue
        cols["requests"].append(b[N])
        cols["requests_s"].append(round(b[N] / span, 3))
        cols["errors_s"].append(round(b[ERRORS] / span, 3))
        cols["rate_limited_s"].append(round(b[LIMITED] / span, 3))
        cols["prompt_tokens_s"].append(round(b[PROMPT] / span, 1))
        cols["completion_tokens_s"].append(round(b[COMPLETION] / span, 1))
        for name, hk in (("e2e", E2E), ("ttft", TTFT)):
            h = {int(i): n for i, n in b[hk].items()}
            for q in (50, 95, 99):
                v = quantile(h, q / 100)
                cols[f"{name}_p{q}"].append(None if v is None or math.isnan(v) else round(v, 5))
        cols["in_flight"].append(b[IN_FLIGHT])
        cols["queued"].append(b[QUEUED])
        cols["waiting"].append(b[WAITING])
    return cols


__all__ = ["BUCKETS", "BUCKET_S", "Series", "quantile"]
