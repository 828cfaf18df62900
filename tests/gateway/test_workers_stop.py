"""Ctrl-C on `gateway serve --workers 4` as a shell delivers it: SIGINT to the whole process
group (the parent and the front doors at once); also SIGTERM, SIGHUP (the terminal closed)
and SIGKILL to the group. The
stop must never restart anything, must end within the drain, and must leave no process of
the gateway behind (found in /proc by the test's own directory in their command line or
environment, so a process started after the signal and no longer a child is found too)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.procs import GatewayProcess, descendants
from tests.gateway.test_tenancy import CHAT
from tests.gateway.test_workers import _alive

ACCEPT_S = 1.0
DRAIN_S = 5.0


def _ours(tmp: Path) -> set[int]:
    """Live processes whose command line or environment names `tmp`."""
    mark = str(tmp).encode()
    out = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark in (proc / "cmdline").read_bytes() or mark in (proc / "environ").read_bytes():
                out.add(int(proc.name))
        except OSError:
            continue
    return {p for p in out if _alive(p)}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_signal_to_the_group_stops_everything_once(tmp_path: Path, sig: int) -> None:
    models = [{"name": "m", "engine": "sim", "options": {"itl_ms": 5}}]
    env = {"GATEWAY_DRAIN_ACCEPT_S": str(ACCEPT_S), "GATEWAY_DRAIN_SECONDS": str(DRAIN_S)}
    gw = GatewayProcess(models, tmp_path, ("--workers", "4"), own_group=True, **env)
    try:
        gw.wait_ready(timeout=180)
        body = {"model": "m", "messages": CHAT, "max_tokens": 2}
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=body).status_code == 200
        before = descendants(gw.proc.pid) | _ours(tmp_path)
        # The parent, 4 front doors and the control process at least.
        assert len(before) >= 6, before
        os.killpg(gw.proc.pid, sig)
        # Within the accept window and the drain, well before a stuck front door would be
        # killed (FRONT_DOOR_MARGIN_S after them).
        code = gw.proc.wait(timeout=ACCEPT_S + DRAIN_S + 10)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        log = gw.log.read_text()
        assert "restarting" not in log, log[-3000:]
        assert "killing it" not in log, log[-3000:]
        # After a SIGKILL, the control process (in its own session) stops on its parent's
        # death, its engines first.
        deadline = time.monotonic() + 30
        while left := {p for p in before | _ours(tmp_path) if _alive(p)}:
            assert time.monotonic() < deadline, (left, log[-3000:])
            time.sleep(0.1)
    finally:
        if gw.proc.poll() is None:
            os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.stop()
        for pid in _ours(tmp_path):  # never leave one behind, even on failure
            os.kill(pid, signal.SIGKILL)
