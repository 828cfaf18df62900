"""Process helpers of the GPU scripts (bench/gpu_trace.py, bench/gpu_usage.py): a log line
with the time, a free loopback port, waiting for a URL to answer 200, a JSON POST, stopping a
process group. Standard library only: the GPU machine's image has no more than the bundle brings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "Spawned",
    "attached_config",
    "free_port",
    "log",
    "post",
    "stop",
    "vllm_serve",
    "wait_http",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until `url` answers 200 (raises past the deadline or if `proc` exits)."""
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not answer before the deadline")
        time.sleep(0.5)


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        data: bytes = r.read()
        return data


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with_group = True
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        with_group = False
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        if with_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


class Spawned:
    """The processes a GPU script starts, each in a process group of its own with its output
    in a log file; `close()` closes the log files (stop the processes first, `stop`)."""

    def __init__(self) -> None:
        self._files: list[BinaryIO] = []

    def start(
        self, cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        f = log_path.open("wb")
        self._files.append(f)
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, process_group=0
        )

    def close(self) -> None:
        for f in self._files:
            f.close()


def vllm_serve(model: str, port: int, *more: str) -> list[str]:
    """`vllm serve` of the bundle's model as the GPU scripts run it (served as `smol`)."""
    return ["vllm", "serve", model, "--served-model-name", "smol", "--port", str(port),
            "--max-model-len", "2048", "--gpu-memory-utilization", "0.4", *more]  # fmt: skip


def attached_config(path: Path, engine: str, url: str, **fields: Any) -> Path:
    """A models.yaml at `path` with one model `smol` of `engine` attached to `url` (and
    any more of the model's `fields`)."""
    import yaml  # the GPU machine has it; imported here so the helpers above need nothing

    model = {"name": "smol", "engine": engine, "endpoints": [url], **fields}
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path
