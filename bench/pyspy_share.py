"""Shares of a py-spy profile by function: read `py-spy record --format raw` output (one
line per distinct stack, `frame;frame;... COUNT`, outermost first) and report each
function's inclusive share (samples with it anywhere on the stack) and self share (it on
top). Used on the GPU runs (bench/gpu_fleet.py `--profile-s`) to compare where a vLLM API
server's time goes with and without a proxy in front; by hand on any raw file:

    .venv/bin/python bench/pyspy_share.py raw.txt [raw2.txt ...] [--top 30]

Owns the parsing and the arithmetic; taking the profile is the caller's.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    out = {str(f): shares(f.read_text(errors="replace"), a.top) for f in a.files}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
