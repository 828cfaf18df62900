"""Fixtures shared by the gateway tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.test_api_sim import SimThread
from tests.recording_upstream import RecordingUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    """A loopback upstream that records every body it receives (one per test module)."""
    up = RecordingUpstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def sims() -> Iterator[SimThread]:
    """A thread with its own event loop running simulator servers (one per test module)."""
    t = SimThread()
    yield t
    t.close()
