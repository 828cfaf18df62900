"""A model name its workers do not serve, found at attach rather than per request: a
models.yaml entry `simw` attached to a simulator that serves `sim-model` (no
`served_model_name`). The gateway reads the worker's `/v1/models`, says so in one log line
naming both names and the key to set, shows the worker as misconfigured on `/health` and
the status page, and routes nothing to it; a worker that serves the name beside it takes
every request; a worker brought back serving the name is admitted by the health loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulator import SimServer
from tests.conftest import ADMIN_KEY, start_gateway
from tests.gateway.test_api_sim import CHAT, SimThread

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
OPTIONS = {"health_interval_s": 0.1, "start_timeout_s": 60.0}


def _workers(url: str) -> list[dict[str, Any]]:
    """The status page's workers of `simw`, with the admin key (URLs and details)."""
    (row,) = [m for m in httpx.get(f"{url}/status", headers=ADMIN).json()["models"]]
    assert row["name"] == "simw"
    return list(row["workers"])


def _chat(url: str) -> httpx.Response:
    body = {"model": "simw", "messages": CHAT, "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_a_worker_serving_another_name_is_misconfigured_not_healthy(
    sims: SimThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = sims.start(model="sim-model")
    models = [{"name": "simw", "engine": "openai", "endpoints": [wrong.url], "options": OPTIONS}]
    caplog.set_level(logging.WARNING, logger="engines.upstream")
    began = time.monotonic()
    gw = start_gateway(models, tmp_path)
    fixed: SimServer | None = None
    try:
        # Found at attach: no waiting out start_timeout_s for a worker that answered.
        assert time.monotonic() - began < OPTIONS["start_timeout_s"]
        lines = [r.getMessage() for r in caplog.records if "misconfigured" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "'sim-model'" in lines[0] and "'simw'" in lines[0]
        assert "served_model_name: sim-model" in lines[0]
        (w,) = _workers(gw.url)
        assert w["state"] == "misconfigured" and not w["healthy"]
        assert w["detail"].startswith("misconfigured:") and "served_model_name" in w["detail"]
        h = httpx.get(f"{gw.url}/health")  # public: states, no URLs or details
        assert h.status_code == 503 and not h.json()["models"]["simw"]["ready"]
        assert h.json()["models"]["simw"]["workers"]["list"][0]["state"] == "misconfigured"
        # Not routed to: no request reaches it (the 503 of no serving worker, not its 404).
        before = wrong.received_total
        r = _chat(gw.url)
        assert r.status_code == 503, r.text
        assert wrong.received_total == before
        # Probes keep finding it the same: still one line.
        time.sleep(0.5)
        lines = [r.getMessage() for r in caplog.records if "misconfigured" in r.getMessage()]
        assert len(lines) == 1, lines

        # The operator restarts the worker serving the name: the health loop admits it.
        port = int(wrong.url.rsplit(":", 1)[1])
        sims.call(wrong.stop())
        fixed = SimServer(model="simw")
        sims.call(fixed.start("127.0.0.1", port))
        deadline = time.monotonic() + 30
        while _workers(gw.url)[0]["state"] != "healthy":
            assert time.monotonic() < deadline, _workers(gw.url)
            time.sleep(0.1)
        assert _chat(gw.url).status_code == 200
        assert any("now serves 'simw'" in r.getMessage() for r in caplog.records)
    finally:
        gw.stop()
        sims.call((fixed or wrong).stop())


def test_requests_go_to_the_worker_that_serves_the_name(sims: SimThread, tmp_path: Path) -> None:
    wrong, right = sims.start(model="sim-model"), sims.start(model="simw")
    models = [
        {
            "name": "simw",
            "engine": "openai",
            "endpoints": [wrong.url, right.url],
            "options": OPTIONS,
        }
    ]
    gw = start_gateway(models, tmp_path)
    try:
        states = sorted(w["state"] for w in _workers(gw.url))
        assert states == ["healthy", "misconfigured"]
        assert httpx.get(f"{gw.url}/health").json()["models"]["simw"]["ready"]
        for _ in range(10):
            assert _chat(gw.url).status_code == 200
        assert (wrong.received_total, right.received_total) == (0, 10)
    finally:
        gw.stop()
        sims.call(wrong.stop())
        sims.call(right.stop())
