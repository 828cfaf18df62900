"""The worker supervisor with real child processes: the simulator (`python -m simulator`)
stands in for a vLLM binary, and small Python scripts play workers that misbehave.

Proves: the wait for `GET /health` with progress lines; a SIGKILLed worker restarted with
backoff and serving again on the same URL (with the restart hook called); `stop()` draining
a worker and every process of its group, escalating to SIGKILL for one that ignores
SIGTERM; a start timeout and an early exit failing the start with `EngineUnavailable`
carrying the worker's last log lines. Nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from engines.base import EngineUnavailable
from engines.launch.command import WorkerCommand, free_port
from engines.launch.supervisor import WorkerSupervisor

REPO = Path(__file__).resolve().parents[3]
# Children import `engines` from the checkout, whatever the test's working directory.
CHILD_ENV = {"PYTHONPATH": str(REPO)}


def sim_worker(label: str, *, startup_s: float = 0.0) -> WorkerCommand:
    """The simulator as a stand-in worker: /health answers 503 for `startup_s`, then 200."""
    port = free_port()
    argv = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--model", "m", "--startup-s", str(startup_s)]
    return WorkerCommand(
        label=label, argv=argv, env=CHILD_ENV, port=port, port_index=argv.index(str(port))
    )


def script_worker(label: str, code: str) -> WorkerCommand:
    port = free_port()
    return WorkerCommand(
        label=label, argv=[sys.executable, "-c", code, str(port)], env=CHILD_ENV, port=port
    )


def _stat(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie (orphans may stay zombies in a container without an init)."""
    st = _stat(str(pid))
    return st is not None and st[0] not in ("Z", "X")


def group_alive(pgid: int) -> bool:
    for pid in os.listdir("/proc"):
        st = _stat(pid) if pid.isdigit() else None
        if st is not None and st[2] == str(pgid) and st[0] not in ("Z", "X"):
            return True
    return False


async def health(url: str) -> int:
    async with httpx.AsyncClient(trust_env=False) as c:
        return (await c.get(url + "/health", timeout=5)).status_code


async def until(cond: Callable[[], object], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_waits_for_health_with_progress_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = WorkerSupervisor(
        [sim_worker("sim[0]", startup_s=2.0)],
        log_dir=tmp_path,
        progress=lines.append,
        progress_interval_s=0.5,
    )
    t0 = time.monotonic()
    urls = await sup.start()
    try:
        # Not before the simulator's /health turned 200 (after its 2 s start-up).
        assert time.monotonic() - t0 >= 2.0
        assert await health(urls[0]) == 200
        starting = [ln for ln in lines if ln.startswith("sim[0] starting… ")]
        assert len(starting) >= 2, lines  # one every 0.5 s while it was not healthy
        assert starting[0].endswith(" s")
        assert lines[-1].startswith(f"sim[0] healthy at {urls[0]} after ")
        state = sup.states()[0]
        assert state.healthy and state.pid is not None and state.restarts == 0
        # Its output went to the log file under the given directory.
        assert (tmp_path / "sim_0_.log").read_text().count("=== ") == 1
    finally:
        await sup.stop()


async def test_waves_start_after_the_previous_one_is_healthy(tmp_path: Path) -> None:
    lines: list[str] = []
    a, b = sim_worker("sim[0]", startup_s=1.0), sim_worker("sim[1]")
    sup = WorkerSupervisor([a, b], log_dir=tmp_path, progress=lines.append, waves=[[0], [1]])
    urls = await sup.start()
    try:
        assert [await health(u) for u in urls] == [200, 200]

        def first(prefix: str) -> int:
            return next(i for i, ln in enumerate(lines) if ln.startswith(prefix))

        assert (
            first("start wave 1/2")
            < first("sim[0] healthy at ")
            < first("start wave 2/2")
            < first("sim[1] healthy at ")
        ), lines
        # sim[1] was launched only after sim[0] answered: its log begins later.
        assert (tmp_path / "sim_1_.log").stat().st_ctime >= (
            tmp_path / "sim_0_.log"
        ).stat().st_ctime
    finally:
        await sup.stop()


async def test_crash_is_restarted_with_backoff_on_the_same_url(tmp_path: Path) -> None:
    lines: list[str] = []
    exits: list[tuple[int, str]] = []
    restarts: list[tuple[int, str]] = []

    async def on_restart(index: int, url: str) -> None:
        restarts.append((index, url))

    sup = WorkerSupervisor(
        [sim_worker("sim[0]"), sim_worker("sim[1]")],
        log_dir=tmp_path,
        progress=lines.append,
        backoff_s=0.2,
        backoff_max_s=0.3,
        on_restart=on_restart,
        on_exit=lambda i, url: exits.append((i, url)),
    )
    urls = await sup.start()
    try:
        first_pid = sup.states()[1].pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        await until(lambda: restarts, 30, "the first restart")
        st = sup.states()[1]
        assert st.healthy and st.restarts == 1 and st.pid not in (None, first_pid)
        assert exits == [(1, urls[1])] and restarts == [(1, urls[1])]
        assert await health(urls[1]) == 200  # same URL, new process
        assert any("sim[1] exited with signal SIGKILL; restarting in 0.2 s" in ln for ln in lines)

        # A second crash soon after: the delay doubles, capped at backoff_max_s.
        second_pid = st.pid
        assert second_pid is not None
        os.kill(second_pid, signal.SIGKILL)
        await until(lambda: len(restarts) == 2, 30, "the second restart")
        assert any("restarting in 0.3 s (restart 2)" in ln for ln in lines), lines
        assert await health(urls[1]) == 200
        # The other worker was never touched.
        assert sup.states()[0].restarts == 0 and await health(urls[0]) == 200
    finally:
        await sup.stop()


# A worker that ignores SIGTERM and has a child of its own in its process group.
STUBBORN = """
import http.server, signal, subprocess, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("grandchild", child.pid, flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


async def test_stop_drains_the_whole_process_group(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = WorkerSupervisor(
        [sim_worker("sim[0]"), script_worker("stubborn[0]", STUBBORN)],
        log_dir=tmp_path,
        progress=lines.append,
        stop_grace_s=1.0,
        progress_interval_s=0.3,
    )
    await sup.start()
    pids = [s.pid for s in sup.states()]
    assert all(p is not None for p in pids)
    log = (tmp_path / "stubborn_0_.log").read_text()
    grandchild = int(log.split("grandchild ")[1].split()[0])
    assert alive(grandchild)

    t0 = time.monotonic()
    await sup.stop()
    took = time.monotonic() - t0
    for pid in pids:
        assert pid is not None
        assert not alive(pid) and not group_alive(pid)
    assert not alive(grandchild)
    # The simulator left on SIGTERM; the stubborn one took the grace period, then SIGKILL
    # (both dead above).
    assert took >= 1.0
    # Progress while it drains, and the kill said out loud; the simulator needed neither.
    assert any(ln.startswith("stubborn[0]: draining… ") for ln in lines)
    assert "stubborn[0]: still running 1 s after SIGTERM: SIGKILL" in lines
    assert not any(ln.startswith("sim[0]:") and "SIGKILL" in ln for ln in lines)
    assert all(s.pid is None and not s.healthy for s in sup.states())
    await sup.stop()  # idempotent


async def test_start_timeout_names_the_worker_and_shows_its_log(tmp_path: Path) -> None:
    code = "import time; print('loading weights... MARKER-7f3a', flush=True); time.sleep(600)"
    sup = WorkerSupervisor(
        [script_worker("vllm[0]", code)],
        log_dir=tmp_path,
        progress=lambda _line: None,
        start_timeout_s=1.0,
    )
    with pytest.raises(EngineUnavailable) as info:
        await sup.start()
    msg = info.value.message
    assert msg.startswith("vllm[0] not healthy after 1 s (start_timeout_s)")
    assert "MARKER-7f3a" in msg and str(tmp_path / "vllm_0_.log") in msg
    assert info.value.status == 503
    # The failed start left nothing running.
    assert all(s.pid is None for s in sup.states())


async def test_early_exit_fails_the_start_at_once(tmp_path: Path) -> None:
    code = "import sys; print('error: unrecognized arguments: --bogus', flush=True); sys.exit(2)"
    good = sim_worker("vllm[1]")
    sup = WorkerSupervisor(
        [script_worker("vllm[0]", code), good],
        log_dir=tmp_path,
        progress=lambda _line: None,
        start_timeout_s=60.0,
    )
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailable) as info:
        await sup.start()
    assert time.monotonic() - t0 < 30  # not the 60 s timeout
    msg = info.value.message
    assert msg.startswith("vllm[0] exited with exit code 2")
    assert "unrecognized arguments: --bogus" in msg
    # The healthy sibling was stopped too.
    with pytest.raises(httpx.ConnectError):
        await health(good.url)


async def test_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    cmd = WorkerCommand(label="vllm[0]", argv=["/nonexistent/vllm", "serve"], env={}, port=1)
    sup = WorkerSupervisor([cmd], log_dir=tmp_path, progress=lambda _line: None)
    with pytest.raises(EngineUnavailable, match=r"vllm\[0\]: cannot run '/nonexistent/vllm'"):
        await sup.start()


def test_with_port_moves_the_port_argument() -> None:
    w = sim_worker("sim[0]")
    moved = w.with_port(12345)
    assert moved.port == 12345 and moved.url == "http://127.0.0.1:12345"
    assert moved.argv[moved.argv.index("--port") + 1] == "12345"
    assert w.argv != moved.argv  # the original is unchanged
