"""The proxies that `bench/overhead.py` puts in front of the simulator, and their processes.

Owns: how each target is installed and started — our gateway (`gateway serve` with a
generated models.yaml), LiteLLM's proxy, `vllm-router` and `sglang-router` (each from PyPI
into its own virtual environment under `bench/.venvs/`, created on first use) — plus
`Proc`, a child process pinned to a CPU whose CPU time we can read from /proc, and the
readiness wait.

Does not own: measuring (loadgen) or comparing and reporting (overhead.py).

Facts these commands rest on (design §8, checked here): `litellm[proxy]` resolves to
1.108.7 offline; LiteLLM refuses to start without a master key and wants
`LITELLM_LOCAL_MODEL_COST_MAP=True` (no network fetch of the cost map); it reaches an
OpenAI-compatible upstream as model `openai/<name>` with `api_base`. `vllm-router` and
`sglang-router launch` both default their Prometheus port to 29000, so each gets its own.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
VENVS = REPO / "bench" / ".venvs"
MODEL = "sim-model"
LITELLM_KEY = "sk-bench-overhead"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: user + system incl. reaped children) of one process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; everything after its ')' is positional.
    rest = raw[raw.rindex(")") + 2 :].split()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, (utime + stime + cutime + cstime) / _CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and every live descendant (LiteLLM may fork workers)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


_STARTED: list[Proc] = []


@atexit.register
def _stop_all() -> None:
    """Safety net: whatever way the benchmark exits, no process it started outlives it."""
    for proc in _STARTED:
        proc.stop(timeout=5.0)


@dataclass
class Proc:
    """A child process in its own session, optionally pinned to one CPU, logging to a file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cpu: int | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = list(self.argv)
        if self.cpu is not None:
            taskset = shutil.which("taskset")
            # taskset pins before exec, so every thread the program later starts (tokio's
            # workers, uvicorn's) inherits the CPU; setting affinity after start would not.
            if taskset:
                argv = [taskset, "-c", str(self.cpu), *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        env = {**os.environ, **self.env}
        preexec: Callable[[], None] | None = None
        if self.cpu is not None and not shutil.which("taskset"):
            cpu = self.cpu

            def preexec() -> None:
                os.sched_setaffinity(0, {cpu})

        self.popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
            start_new_session=True,  # its own process group: stop() ends it and its children
            preexec_fn=preexec,
        )
        log.close()
        _STARTED.append(self)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid) if self.alive() else 0.0

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # start_new_session: the group id is the child's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            pass

    async def wait_ready(self, url: str, headers: dict[str, str], within_s: float) -> None:
        """Poll `url` until it answers 200; raise with the log's tail if the process died."""
        deadline = time.monotonic() + within_s
        last = ""
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.alive():
                    code = self.popen.returncode if self.popen else None
                    raise RuntimeError(
                        f"{self.name} exited with status {code} before it was ready:\n"
                        + self.log_tail()
                    )
                try:
                    async with session.get(
                        url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.25)
        raise RuntimeError(
            f"{self.name} not ready after {within_s:.0f} s ({last}):\n" + self.log_tail()
        )


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Something to put between the load generator and the simulator."""

    name: str  # short id: gateway, litellm, vllm-router, sglang-router
    title: str
    language: str
    requirement: str | None  # pip requirement; None = this repository (our gateway)
    dist: str | None = None  # distribution name whose version we report
    api_key: str | None = None
    ready_timeout_s: float = 60.0
    # For our gateway: the checkout to run (None = this one). `--baseline DIR` sets it to
    # another worktree, e.g. the commit before a change, to compare both in one run.
    repo: Path | None = None

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def command(self, port: int, upstream: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment to serve MODEL on 127.0.0.1:port in front of upstream."""
        host = "127.0.0.1"
        if self.requirement is None:
            cfg = workdir / "gateway-models.yaml"
            cfg.write_text(
                "# generated by bench/overhead.py: the simulator, attached by URL\n"
                "models:\n"
                f"  - name: {MODEL}\n"
                "    engine: openai\n"
                f"    endpoints: [{upstream}]\n"
                "    max_model_len: 8192\n"
                "    max_tokens_default: 256\n"
            )
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                    "--host", host, "--port", str(port)]  # fmt: skip
            repo = self.repo or REPO
            return argv, {"GATEWAY_LOG_LEVEL": "warning", "PYTHONPATH": str(repo)}
        if self.name == "litellm":
            cfg = workdir / "litellm-config.yaml"
            cfg.write_text(
                "# generated by bench/overhead.py\n"
                "model_list:\n"
                f"  - model_name: {MODEL}\n"
                "    litellm_params:\n"
                f"      model: openai/{MODEL}\n"
                f"      api_base: {upstream}/v1\n"
                "      api_key: sk-unused\n"
                "general_settings:\n"
                f"  master_key: {LITELLM_KEY}\n"
                "litellm_settings:\n"
                "  telemetry: false\n"
            )
            argv = [str(self.venv / "bin" / "litellm"), "--config", str(cfg),
                    "--host", host, "--port", str(port), "--num_workers", "1"]  # fmt: skip
            env = {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_TELEMETRY": "False",
            }
            return argv, env
        if self.name == "vllm-router":
            argv = [str(self.venv / "bin" / "vllm-router"), "--host", host, "--port", str(port),
                    "--worker-urls", upstream, "--policy", "round_robin",
                    "--prometheus-port", str(free_port()), "--log-level", "warning"]  # fmt: skip
            return argv, {}
        if self.name == "sglang-router":
            argv = [str(self.venv / "bin" / "sglang-router"), "launch", "--host", host,
                    "--port", str(port), "--worker-urls", upstream, "--policy", "round_robin",
                    "--prometheus-port", str(free_port()), "--log-level", "warn"]  # fmt: skip
            return argv, {}
        raise ValueError(f"unknown target {self.name}")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("gateway", "this gateway", "Python", None),
        Target(
            "litellm", "LiteLLM proxy", "Python", "litellm[proxy]", "litellm",
            api_key=LITELLM_KEY, ready_timeout_s=180.0,
        ),
        Target("vllm-router", "vllm-router", "Rust", "vllm-router", "vllm-router"),
        Target("sglang-router", "sglang-router", "Rust", "sglang-router", "sglang-router"),
    )
}  # fmt: skip


def installed_version(target: Target) -> str | None:
    if target.requirement is None:
        return "this checkout"
    py = target.python()
    if not py.exists():
        return None
    out = subprocess.run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version({target.dist!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_installed(target: Target, log: Callable[[str], None]) -> str:
    """Create the target's venv and pip-install it if needed; return its version.

    Raises RuntimeError with the tail of pip's output when the install fails.
    """
    version = installed_version(target)
    if version:
        return version
    assert target.requirement is not None
    VENVS.mkdir(parents=True, exist_ok=True)
    (VENVS / ".gitignore").write_text("*\n")  # never committed, whatever .gitignore says
    log(f"[install] {target.name}: creating {target.venv.relative_to(REPO)} ...")
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(target.venv)], check=True)
    log(f"[install] {target.name}: pip install '{target.requirement}' (may take minutes) ...")
    proc = subprocess.Popen(
        [str(target.python()), "-m", "pip", "install", "--progress-bar", "off",
         "--disable-pip-version-check", target.requirement],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("WARNING: Location"):
            continue  # this machine's pip config lists local mirrors that may be absent
        tail = [*tail[-29:], line]
        if line.startswith(("Collecting", "Successfully", "ERROR")):
            log(f"[install] {target.name}: {line}")
    if proc.wait() != 0:
        raise RuntimeError(f"pip install '{target.requirement}' failed:\n" + "\n".join(tail))
    version = installed_version(target)
    if not version:
        raise RuntimeError(f"{target.dist} installed but its version cannot be read")
    log(f"[install] {target.name}: {version}")
    return version


def sim_command(port: int, ttft_ms: float, itl_ms: float, max_tokens: int) -> list[str]:
    """The simulator every proxy benchmark puts behind the proxies: no jitter, a fixed
    number of tokens per answer."""
    return [sys.executable, "-m", "gateway", "sim", "--host", "127.0.0.1", "--port", str(port),
            "--model", MODEL, "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
            "--jitter", "0", "--output-tokens", str(max_tokens)]  # fmt: skip


def sim_proc(work: Path, port: int, ttft_ms: float, itl_ms: float, max_tokens: int) -> Proc:
    """That simulator as a process pinned to CPU 0 (the load generator's CPU)."""
    argv = sim_command(port, ttft_ms, itl_ms, max_tokens)
    return Proc("sim", argv, work / "sim.log", env={"PYTHONPATH": str(REPO)}, cpu=0, cwd=REPO)
