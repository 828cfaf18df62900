"""`gateway serve --workers 3` as an operator runs it: a control process owning a
launched engine (the simulator engine, in process there), three front doors on one port
sharing the real Redis (own key prefix); SIGTERM stops every process it started."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY
from tests.gateway.procs import (
    SHARED_REDIS,
    GatewayProcess,
    clean_prefix,
    descendants,
    fake_adapter,
    new_prefix,
)
from tests.gateway.test_tenancy import CHAT, create_key


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    prefix = new_prefix()
    root = tmp_path / "loras"
    fake_adapter(root)
    models = [
        {
            "name": "m",
            "engine": "sim",
            "options": {"itl_ms": 1},
            "lora": {"max_adapters": 2, "roots": [str(root)]},
        }
    ]
    env = {
        "GATEWAY_REDIS_URL": SHARED_REDIS,
        "GATEWAY_REDIS_PREFIX": prefix,
        # Bounds the stop below (front doors, then the control: 5 s of drain each at most)
        # well inside GatewayProcess.stop's 30 s.
        "GATEWAY_DRAIN_SECONDS": "5",
    }
    gw = GatewayProcess(models, tmp_path, ("--workers", "3"), **env)
    try:
        yield {"gw": gw.wait_ready(timeout=180), "tmp": tmp_path, "root": root}
    finally:
        gw.stop()
        clean_prefix(prefix)


def test_three_front_doors_share_limits_and_stop_on_sigterm(workers: dict[str, Any]) -> None:
    gw: GatewayProcess = workers["gw"]
    procs = descendants(gw.proc.pid)
    # The control process and uvicorn's three front doors (plus its resource tracker).
    assert len(procs) >= 4, procs
    free = create_key(gw.url)
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=free["key"], max_retries=0) as c:
        for _ in range(12):  # new connections: the kernel spreads them over the front doors
            r = c.chat.completions.create(model="m", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
            assert r.usage is not None and r.usage.completion_tokens == 2
    limited = create_key(gw.url, rpm=5)
    admitted = 0
    for _ in range(10):
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=limited["key"], max_retries=0) as c:
            try:
                c.chat.completions.create(model="m", messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
                admitted += 1
            except openai.RateLimitError:
                pass
    assert admitted == 5  # one limit across the three processes

    # An adapter loaded through one front door is served by all, also by a restarted one.
    r = httpx.post(
        f"{gw.url}/v1/load_lora_adapter",
        json={"lora_name": "a1", "lora_path": str(workers["root"] / "a1")},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert r.status_code == 200, r.text
    fronts = [p for p in descendants(gw.proc.pid) if b"spawn_main" in _cmdline(p)]
    assert len(fronts) == 3
    os.kill(fronts[0], signal.SIGKILL)  # uvicorn's supervisor starts a new front door
    deadline = time.monotonic() + 60
    while len([p for p in descendants(gw.proc.pid) if b"spawn_main" in _cmdline(p)]) < 3 or {
        p for p in descendants(gw.proc.pid) if b"spawn_main" in _cmdline(p)
    } == set(fronts):
        assert time.monotonic() < deadline, "no front door was restarted"
        time.sleep(0.2)
    served: list[int] = []
    deadline = time.monotonic() + 60
    while len(served) < 30:  # 30 in a row, each on a new connection, answered as a1
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=free["key"], max_retries=0) as c:
            try:
                c.chat.completions.create(model="a1", messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
                served.append(1)
            except (openai.NotFoundError, openai.APIConnectionError):
                served.clear()  # a front door not yet in step (or still starting)
                assert time.monotonic() < deadline, "a1 not served by every front door"
                time.sleep(0.2)
    procs |= descendants(gw.proc.pid)
    code = gw.stop(signal.SIGTERM)
    log = gw.log.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "did not stop" not in log, log[-3000:]  # nothing had to be killed
    # uvicorn's resource tracker leaves when its pipe from the parent closes: wait for it.
    deadline = time.monotonic() + 15
    while [p for p in procs if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in procs if _alive(p)]
    assert not list(workers["tmp"].glob(".models-*"))  # the generated catalogs are removed


def test_a_front_door_stuck_in_its_stop_is_killed_and_said(tmp_path: Path) -> None:
    """A front door that never finishes its shutdown (here: stopped with SIGSTOP, so
    SIGTERM waits) does not keep the gateway up: the parent says whom it waits for, kills
    it after drain + FRONT_DOOR_MARGIN_S, stops the control process and exits 0."""
    models = [{"name": "m", "engine": "sim", "options": {"itl_ms": 1}}]
    gw = GatewayProcess(models, tmp_path, ("--workers", "2"), GATEWAY_DRAIN_SECONDS="1")
    procs: set[int] = set()
    try:
        gw.wait_ready(timeout=180)
        procs = descendants(gw.proc.pid)
        fronts = sorted(p for p in procs if b"spawn_main" in _cmdline(p))
        assert len(fronts) == 2
        os.kill(fronts[0], signal.SIGSTOP)
        code = gw.stop(signal.SIGTERM)
        log = gw.log.read_text(errors="replace")
        assert code == 0, log[-3000:]
        # In order: waited for (at least once), then killed; the other door stopped itself.
        waiting = log.find(f"waiting for front door [{fronts[0]}]")
        killed = log.find(f"front door [{fronts[0]}] did not stop in time; killing it")
        assert 0 <= waiting < killed, log[-3000:]
        assert f"front door [{fronts[1]}] did not stop" not in log
        deadline = time.monotonic() + 15
        while [p for p in procs if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in procs if _alive(p)]
    finally:  # on a failure, leave no stopped process behind
        gw.stop(signal.SIGKILL)
        for p in procs:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
