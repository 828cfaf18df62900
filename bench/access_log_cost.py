"""What the access log costs a request, and what its batch costs per line, in CPU µs.

    .venv/bin/python bench/access_log_cost.py [--lines 100000] [--dry-run]

Owns one measurement: `AccessLog.emit` as the request path calls it (building the entry
tuple and appending it) against the later batch flush (formatting and one write per
batch, to /dev/null). Process CPU time over many lines, best of three; this machine's
noise moves the figures by ±20 %. Results go in docs/benchmarks.md, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.access_log import AccessLog  # noqa: E402

BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index"'
    b':0,"message":{"role":"assistant","content":"' + b"word " * 16 + b'"},"logprobs":null,'
    b'"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":16,'
    b'"total_tokens":21}}'
)


class _OneBatch(AccessLog):
    """No flush while the path is timed: one batch at the end."""

    __slots__ = ()
    LIMIT = 1 << 30


async def measure(lines: int) -> tuple[float, float]:
    """(µs per request on the path, µs per line in the batch), inside a running loop as
    in the gateway (the batch's timer is armed once and never fires before the flush)."""
    log = _OneBatch(True, 1.0)
    auth = b"Bearer sk-bench-key"
    t0 = time.process_time()
    for i in range(lines):
        log.emit((time.time(), f"req-{i}", "m", None, auth, "chat", False, 200, 5, 16,
                  None, 0.0012, None, (BODY,), "http://127.0.0.1:9000", 0))  # fmt: skip
    path = time.process_time() - t0
    fd = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        t0 = time.process_time()
        log.flush()
        batch = time.process_time() - t0
    finally:
        os.dup2(fd, 1)
        os.close(null)
        os.close(fd)
    return path / lines * 1e6, batch / lines * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--dry-run", action="store_true", help="a few lines, to check it runs")
    a = p.parse_args(argv)
    n = 100 if a.dry_run else a.lines
    runs = [asyncio.run(measure(n)) for _ in range(1 if a.dry_run else 3)]
    path = min(r[0] for r in runs)
    batch = min(r[1] for r in runs)
    print(f"access log: {path:.2f} µs per request on the path, {batch:.2f} µs per line "
          f"in the batch ({n} lines, best of {len(runs)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
