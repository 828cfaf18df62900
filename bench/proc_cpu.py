"""CPU seconds by kind of process, for the GPU benchmarks (bench/gpu_fleet.py): what each
of vLLM's API servers and engine cores, the gateway's front doors and control process,
vllm-router, Redis and the load generators used over one run, and how busy the machine's
CPUs were. Read from /proc (Linux only); a process that ends during the run is counted
through `wait_cpu_s` (its rusage) or not at all.

Owns the reading and the grouping only; which runs to compare is the caller's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any


def cpu_s(pid: int | None) -> float:
    """utime + stime of one process, in seconds (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_facts() -> dict[str, Any]:
    """The CPUs the runs shared (lscpu's summary lines)."""
    facts: dict[str, Any] = {"cpus": os.cpu_count()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "NUMA")
        facts["lscpu"] = [ln.strip() for ln in out.splitlines() if ln.startswith(keep)]
    return facts


def _group_of(pid: int, doors: dict[str, list[int]], controls: dict[str, int]) -> str:
    for name, pids in doors.items():
        if pid in pids:
            return f"{name}:front-doors"
    for name, root in controls.items():
        if pid == root:
            return f"{name}:control"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    # By the program and its first arguments, not by any word of the command line: this
    # benchmark's own command line names `vllm-router` and `redis-server` as its options.
    prog = Path(argv[0].decode(errors="replace")).name
    head = argv[1:4]
    # vllm-router is a Python launcher that retitles itself "vllm::router" (setproctitle).
    router = {"vllm-router", "vllm::router"}
    if prog in router or comm in router or any(a.endswith(b"/vllm-router") for a in head[:1]):
        return "vllm-router"
    if comm.startswith("VLLM::EngineCor"):
        return "vllm-engine-core"
    # `--api-server-count N > 1`: N spawned processes titled VLLM::APIServer_i serve
    # (their cmdline is multiprocessing's), the `vllm serve` parent only supervises.
    if comm.startswith("VLLM::APIServer"):
        return "vllm-api-server"
    if (prog == "vllm" and b"serve" in head) or any(
        a.startswith(b"vllm.entrypoints") for a in head
    ):
        return "vllm-api-server"
    if prog == "redis-server":
        return "redis"
    return "other"


def cpu_by_group(doors: dict[str, list[int]], controls: dict[str, int]) -> dict[str, float]:
    """utime + stime of every live process, summed by kind (vLLM engine cores, vLLM API
    servers, each gateway's front doors and control process, Redis, the rest)."""
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cpu = cpu_s(pid)
        if cpu:
            g = _group_of(pid, doors, controls)
            out[g] = out.get(g, 0.0) + cpu
    return out


def pids_of(kind: str) -> list[int]:
    """The live processes of one kind (as `cpu_by_group` names them, gateways aside)."""
    return sorted(
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and _group_of(int(e.name), {}, {}) == kind
    )


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return float(sum(f[:8]) - idle), float(sum(f[:8]))


def machine_busy_since(before: tuple[float, float]) -> float:
    """How many CPUs were busy on average since `before` (machine-wide)."""
    b, t = machine_busy()
    cpus = os.cpu_count() or 1
    return round((b - before[0]) / max(1.0, t - before[1]) * cpus, 2)


def wait_cpu_s(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for a child and return the CPU seconds it used (its own and its children's)."""
    until = time.time() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.time() > until:
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)
