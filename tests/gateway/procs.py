"""Test helpers for shared-state tests: a unique Redis prefix on the shared 127.0.0.1:6379
(cleaned after), a private redis-server on a free port (for outage tests — the shared
one is never stopped), and `gateway serve` processes started the way an operator would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Self

import httpx
import redis
import yaml

from tests.conftest import ADMIN_KEY, CACHE, REPO, free_port

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def new_prefix() -> str:
    return f"gwtest-{uuid.uuid4().hex[:10]}"


def clean_prefix(prefix: str, url: str = SHARED_REDIS) -> None:
    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


class OwnRedis:
    """A redis-server of the test's own on a free port, data kept across its restarts."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [
                *(exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)),
                *("--appendonly", "yes", "--save", "", "--protected-mode", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
            self.proc = None


class ChildServer:
    """A server in a child process (`url`, `proc`, its output in `log`): wait for its
    /health, stop it with a signal."""

    what = "server"
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    _log: Any

    def wait_ready(self, timeout: float = 120) -> Self:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(self.log.read_text()[-2000:])
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class GatewayProcess(ChildServer):
    """`python -m gateway serve` in a child process, on its own port."""

    what = "gateway"

    def __init__(
        self,
        models: list[dict[str, Any]],
        tmp: Path,
        args: tuple[str, ...] = (),
        own_group: bool = False,
        **env: str,
    ):
        # own_group: in a process group of its own, as a shell starts a command (Ctrl-C
        # then signals the whole group).
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / f"models-{self.port}.yaml"
        config.write_text(yaml.safe_dump({"models": models}))
        full_env = {
            **os.environ,
            "GATEWAY_CACHE_DIR": str(CACHE),
            "GATEWAY_ADMIN_KEY": ADMIN_KEY,
            "GATEWAY_LOG_LEVEL": "warning",
            # No accept window on stop (5 s each by default) unless a test asks for one:
            # only the drain tests look at it.
            "GATEWAY_DRAIN_ACCEPT_S": "0",
            "PYTHONPATH": str(REPO),
            **env,
        }
        self.log = tmp / f"gateway-{self.port}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--port",
                str(self.port),
                *args,
            ],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            process_group=0 if own_group else None,
        )


class SimProcess(ChildServer):
    """`python -m simulator` in a child process, as a worker runs beside the gateway (its own
    event loop and interpreter, not a thread of the test's). `counter` reads its /metrics."""

    what = "simulator"

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"sim-{self.port}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", str(self.port), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def counter(self, name: str) -> float:
        """A counter from the worker's own /metrics (e.g. `vllm:generation_tokens_total`)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def fake_adapter(root: Path, name: str = "a1") -> Path:
    """A directory the gateway accepts as a LoRA adapter (config + weights file); the
    simulator workers never read it."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return d


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc's children lists)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = task / "children"
            if children.exists():
                for c in children.read_text().split():
                    out.add(int(c))
                    todo.append(int(c))
    return out


LISTEN, ESTABLISHED = "0A", "01"


def tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of the IPv4 TCP sockets in `state` whose local port is `port`."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == state:
            out.add(int(f[9]))
    return out


def socket_holders(pids: set[int]) -> dict[int, set[int]]:
    """socket inode → the pids holding it."""
    out: dict[int, set[int]] = {}
    for pid in pids:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    out.setdefault(int(target[8:-1]), set()).add(pid)
    return out


def port_listeners(gw: GatewayProcess, at_least: int = 0, within: float = 120.0) -> set[int]:
    """The processes (the gateway's and its descendants) holding a listening socket on the
    gateway's port; with `at_least`, waited for until that many hold one (a ready gateway
    of several front doors may still be starting some)."""
    deadline = time.monotonic() + within
    while True:
        listening = tcp_sockets(gw.port, LISTEN)
        held = socket_holders(descendants(gw.proc.pid) | {gw.proc.pid})
        pids = {pid for inode in listening for pid in held.get(inode, ())}
        if len(pids) >= at_least or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def connections_held(port: int, pids: set[int]) -> dict[int, int]:
    """Established connections on `port` per process of `pids` (0 for one holding none)."""
    held = socket_holders(pids)
    out = dict.fromkeys(pids, 0)
    for inode in tcp_sockets(port, ESTABLISHED):
        for pid in held.get(inode, ()):
            out[pid] += 1
    return out
