"""Running launched workers: each in its own process group, watched and restarted.

Owns `WorkerSupervisor`: output in a log file under the cache dir, a wait for
`GET /health` → 200 with progress lines and a start timeout, restart of a crashed worker
with exponential backoff (telling the engine, so it can re-apply runtime state such as
LoRA adapters), and a drain on `stop()` (SIGTERM to the group, a grace period, then
SIGKILL). Does not build command lines (`engines.launch.command`) or relay requests; it
never imports vllm or lmdeploy: workers are separate programs started by their command
line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import aiohttp

from engines.base import EngineUnavailable
from engines.launch.command import WorkerCommand

__all__ = ["WorkerState", "WorkerSupervisor", "safe_name"]


@dataclass(slots=True)
class WorkerState:
    """What the supervisor knows about one worker now."""

    label: str
    url: str
    pid: int | None = None
    healthy: bool = False
    restarts: int = 0
    detail: str = "not started"
    log_path: Path | None = None


@dataclass(slots=True)
class _Worker:
    cmd: WorkerCommand
    state: WorkerState
    proc: asyncio.subprocess.Process | None = None
    log: IO[bytes] | None = None
    monitor: asyncio.Task[None] | None = None
    healthy_since: float | None = None
    backoff: float = 0.0


# Called after a crashed worker is healthy again: (worker index, its base URL).
RestartHook = Callable[[int, str], Awaitable[None]]
# Called as soon as a worker is seen to have exited: (worker index, its base URL).
ExitHook = Callable[[int, str], None]


class WorkerSupervisor:
    """Runs a fixed set of workers and keeps them running until `stop()`.

    `start()` launches every worker (wave by wave when `waves` is given: workers that must
    not start together, such as replicas sharing a GPU that each size their memory at
    start), waits until each answers `GET /health` with 200, and
    returns their base URLs (stable for the supervisor's life: a restarted worker comes
    back on the same port, so relays and routers keep their URL list). A worker that exits
    before it is healthy, or is not healthy within `start_timeout_s`, fails the start with
    `EngineUnavailable` carrying the last lines of its log; the others are stopped.

    After the start, a worker that exits is restarted after a backoff (doubling from
    `backoff_s` to `backoff_max_s`, back to `backoff_s` once a worker has stayed healthy for
    `backoff_reset_s`); `on_exit(index, url)` runs when the exit is seen and
    `on_restart(index, url)` once the worker is healthy again.
    """

    def __init__(
        self,
        workers: Sequence[WorkerCommand],
        *,
        log_dir: Path,
        progress: Callable[[str], object] = print,
        start_timeout_s: float = 900.0,
        stop_grace_s: float = 30.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        backoff_reset_s: float = 120.0,
        on_restart: RestartHook | None = None,
        on_exit: ExitHook | None = None,
        health_path: str = "/health",
        poll_interval_s: float = 0.25,
        progress_interval_s: float = 5.0,
        tail_lines: int = 40,
        waves: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self._workers = [
            _Worker(cmd=w, state=WorkerState(label=w.label, url=w.url)) for w in workers
        ]
        # Start order: each wave (worker indices) is launched once the previous one is
        # healthy; default one wave of all (the engine decides, see `start_waves`).
        self.waves = [list(w) for w in waves] if waves else [list(range(len(workers)))]
        self.log_dir = log_dir
        self._progress = progress
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.backoff_reset_s = backoff_reset_s
        self.on_restart = on_restart
        self.on_exit = on_exit
        self.health_path = health_path
        self.poll_interval_s = poll_interval_s
        self.progress_interval_s = progress_interval_s
        self.tail_lines = tail_lines
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # ------------------------------------------------------------------ public

    @property
    def urls(self) -> list[str]:
        return [w.cmd.url for w in self._workers]

    def states(self) -> list[WorkerState]:
        return [replace(w.state) for w in self._workers]

    async def start(self) -> list[str]:
        self._stopping = False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5.0),
            # The workers are on loopback; a proxy from the environment must not apply.
            trust_env=False,
        )
        try:
            for n, wave in enumerate(self.waves):
                if len(self.waves) > 1:
                    names = ", ".join(self._workers[i].cmd.label for i in wave)
                    self._progress(f"start wave {n + 1}/{len(self.waves)}: {names}")
                for i in wave:
                    await self._launch(self._workers[i])
                results = await asyncio.gather(
                    *(self._wait_healthy(self._workers[i], first=True) for i in wave),
                    return_exceptions=True,
                )
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise failed[0]
        except BaseException:
            await self.stop()
            raise
        for i, w in enumerate(self._workers):
            w.monitor = asyncio.create_task(self._watch(i, w), name=f"watch {w.cmd.label}")
        return self.urls

    async def stop(self) -> None:
        """Drain: SIGTERM each worker's process group, wait up to the grace period,
        SIGKILL what is left. Safe to call twice, or after a failed start."""
        self._stopping = True
        monitors = [w.monitor for w in self._workers if w.monitor is not None]
        for t in monitors:
            t.cancel()
        for t in monitors:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.gather(*(self._terminate(w) for w in self._workers))
        for w in self._workers:
            w.monitor = None
            w.state.healthy = False
            w.state.detail = "stopped"
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ internals

    async def _launch(self, w: _Worker) -> None:
        # A crashed leader can leave children behind in its group (vLLM's engine-core
        # process holds the GPU memory): clear them before the port and GPUs are reused.
        if w.proc is not None:
            _killpg(w.proc.pid, signal.SIGKILL)
        path = self.log_dir / f"{safe_name(w.cmd.label)}.log"
        w.state.log_path = path
        if w.log is not None:
            w.log.close()
        w.log = path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        w.log.write(f"\n=== {stamp} launch: {' '.join(w.cmd.argv)}\n".encode())
        w.log.flush()
        env = {**os.environ, **w.cmd.env}
        try:
            # Output goes straight to the file, never through a pipe we must drain: a busy
            # event loop can then never block a worker on a full pipe.
            w.proc = await asyncio.create_subprocess_exec(
                *w.cmd.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=w.log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                # Own session and process group: signals reach the worker and all its
                # children (tensor-parallel ranks, engine core), and a Ctrl-C in the
                # gateway's terminal does not hit workers before the gateway drains them.
                start_new_session=True,
            )
        except OSError as exc:
            raise EngineUnavailable(
                f"{w.cmd.label}: cannot run {w.cmd.argv[0]!r}: {exc}", code="worker_launch"
            ) from exc
        w.state.pid = w.proc.pid
        w.state.healthy = False
        w.state.detail = "starting"
        w.healthy_since = None

    async def _wait_healthy(self, w: _Worker, *, first: bool) -> None:
        proc = w.proc
        assert proc is not None
        label, t0 = w.cmd.label, time.monotonic()
        next_note = t0 + self.progress_interval_s
        # One waiter for the whole wait, so a poll can wake as soon as the process exits.
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if proc.returncode is not None:
                    raise self._failure(w, f"exited with {_exit_text(proc.returncode)}")
                if await self._healthy(w):
                    w.state.healthy = True
                    w.state.detail = "healthy"
                    w.healthy_since = time.monotonic()
                    took = time.monotonic() - t0
                    self._progress(f"{label} healthy at {w.cmd.url} after {took:.0f} s")
                    return
                now = time.monotonic()
                if now - t0 > self.start_timeout_s:
                    raise self._failure(
                        w, f"not healthy after {self.start_timeout_s:.0f} s (start_timeout_s)"
                    )
                if now >= next_note:
                    verb = "starting" if first else "restarting"
                    self._progress(f"{label} {verb}… {now - t0:.0f} s")
                    next_note += self.progress_interval_s
                await asyncio.wait({exited}, timeout=self.poll_interval_s)
        finally:
            exited.cancel()

    async def _healthy(self, w: _Worker) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(w.cmd.url + self.health_path) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _failure(self, w: _Worker, what: str) -> EngineUnavailable:
        tail = _tail(w.state.log_path, self.tail_lines)
        w.state.detail = what
        msg = f"{w.cmd.label} {what}; log: {w.state.log_path}"
        if tail:
            msg += f"\n--- last lines ---\n{tail}"
        return EngineUnavailable(msg, code="worker_start_failed")

    async def _watch(self, index: int, w: _Worker) -> None:
        """Restart the worker whenever it exits, until stop()."""
        while not self._stopping:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            w.state.healthy = False
            w.state.restarts += 1
            if self.on_exit is not None:
                self.on_exit(index, w.cmd.url)
            up = time.monotonic() - w.healthy_since if w.healthy_since is not None else 0.0
            if w.backoff == 0.0 or up >= self.backoff_reset_s:
                w.backoff = self.backoff_s
            else:
                w.backoff = min(w.backoff * 2, self.backoff_max_s)
            w.state.detail = f"exited with {_exit_text(code)}; restart in {w.backoff:.1f} s"
            self._progress(
                f"{w.cmd.label} exited with {_exit_text(code)}; restarting in "
                f"{w.backoff:.1f} s (restart {w.state.restarts})"
            )
            await asyncio.sleep(w.backoff)
            try:
                await self._launch(w)
                await self._wait_healthy(w, first=False)
            except EngineUnavailable as exc:
                # Counted as another crash: the loop waits on the (dead or killed) process
                # and backs off further.
                self._progress(str(exc).splitlines()[0])
                if w.proc is not None and w.proc.returncode is None:
                    _killpg(w.proc.pid, signal.SIGKILL)
                continue
            if self.on_restart is not None:
                try:
                    await self.on_restart(index, w.cmd.url)
                except Exception as exc:  # the worker serves; report, don't kill the watch
                    self._progress(f"{w.cmd.label}: re-applying state after restart failed: {exc}")

    async def _terminate(self, w: _Worker) -> None:
        proc = w.proc
        if proc is not None:
            pgid = proc.pid  # leader of its own session: pgid == pid
            if proc.returncode is None or _group_alive(pgid):
                _killpg(pgid, signal.SIGTERM)
                t0 = time.monotonic()
                deadline = t0 + self.stop_grace_s
                next_line = t0 + self.progress_interval_s
                # Wait for the leader and the stragglers in its group, within the grace.
                # Children have no exit event we can await (they are not ours): poll.
                while time.monotonic() < deadline:
                    if proc.returncode is not None and not _group_alive(pgid):
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 0.05)
                    now = time.monotonic()
                    if now >= next_line:
                        next_line = now + self.progress_interval_s
                        self._progress(
                            f"{w.cmd.label}: draining… {now - t0:.0f} s "
                            f"(SIGKILL at {self.stop_grace_s:g} s)"
                        )
                if _group_alive(pgid) or proc.returncode is None:
                    self._progress(
                        f"{w.cmd.label}: still running {self.stop_grace_s:g} s after "
                        "SIGTERM: SIGKILL"
                    )
                    _killpg(pgid, signal.SIGKILL)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 5.0)
            w.state.pid = None
        if w.log is not None:
            w.log.close()
            w.log = None


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: an orphaned
    child is reaped by PID 1, which in a container may never do it, and killpg(pgid, 0)
    would still succeed for it."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _tail(path: Path | None, lines: int) -> str:
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        data = f.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
