"""py-spy profiles of running processes, and their shares by function.

`record` samples processes with `py-spy record --nonblocking --format raw` (the process is
never stopped) for a fixed time; `shares` reads raw output (one line per distinct stack,
`frame;frame;... COUNT`, outermost first) into each function's inclusive share (samples
with it anywhere on the stack) and self share (it on top). bench/gpu_fleet.py
(`--profile-s`) uses both to compare where a vLLM API server's time goes with and without
a proxy in front; by hand on any raw file:

    .venv/bin/python bench/pyspy_profile.py raw.txt [raw2.txt ...] [--top 30]

Owns taking and reading profiles; which processes and when is the caller's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_cpu import cpu_s

# "func (path/to/file.py:123)": the line number is dropped so one function is one row.
_LINE = re.compile(r":\d+\)$")


def _frame_name(frame: str) -> str:
    return _LINE.sub(")", frame.strip())


def shares(text: str, top: int = 30) -> dict[str, Any]:
    """{samples, inclusive: [[name, share], ...], self: [...]} of one raw profile."""
    total = 0
    incl: dict[str, int] = {}
    own: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        for name in set(frames):
            incl[name] = incl.get(name, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n

    def rank(d: dict[str, int]) -> list[list[Any]]:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(c / max(1, total), 4)] for name, c in rows]

    return {"samples": total, "inclusive": rank(incl), "self": rank(own)}


def record(pids: list[int], seconds: int, out: Path, label: str) -> dict[str, Any]:
    """Sample each process at 200 Hz for `seconds`, all at once, into out/LABEL-PID.txt;
    per pid: its CPU seconds over the sampling and `shares` of its profile (or py-spy's
    error)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for pid in pids:
        raw = out / f"{label}-{pid}.txt"
        cmd = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
        cmd += ["--nonblocking", "--format", "raw", "-o", str(raw)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs[pid] = (raw, cpu_s(pid), proc)
    found: dict[str, Any] = {}
    for pid, (raw, cpu0, proc) in procs.items():
        _, err = proc.communicate(timeout=seconds + 30)
        entry: dict[str, Any] = {"cpu_s": round(cpu_s(pid) - cpu0, 2)}
        if raw.exists():
            entry.update(shares(raw.read_text(errors="replace"), top=40))
        else:
            entry["error"] = err.decode(errors="replace")[-400:]
        found[str(pid)] = entry
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    out = {str(f): shares(f.read_text(errors="replace"), a.top) for f in a.files}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
