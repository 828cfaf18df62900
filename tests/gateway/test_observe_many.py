"""`gateway.metrics.observe_many` (the relay's once-per-stream gap observation) exports
the same histogram as observing each value with prometheus-client's own `observe`."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway.metrics import _ITL_BUCKETS, observe_many


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_equals_observe_per_value() -> None:
    rng = random.Random(7)
    # Values on every bound, between bounds, below the first and past the last.
    values = [*_ITL_BUCKETS, 0.0, 5.0, 1e-9] + [rng.uniform(0, 2) for _ in range(500)]
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("gap", "g", ["model"], buckets=_ITL_BUCKETS, registry=one)
    h_many = Histogram("gap", "g", ["model"], buckets=_ITL_BUCKETS, registry=many)
    for v in values:
        h_one.labels("m").observe(v)
    observe_many(h_many.labels("m"), values[:100])
    observe_many(h_many.labels("m"), values[100:])
    a, b = _samples(one), _samples(many)
    assert a.keys() == b.keys()
    assert a[("gap_count", "")] == len(values)
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-12), key
