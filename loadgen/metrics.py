"""Per-request records and the statistics computed from them.

Owns: `RequestRecord` (what one request saw, in seconds relative to its own send time),
`Stats` (mean / p50 / p90 / p99 of one series) and `summarize()`, which turns the records
of one run into the summary dict that the report, the JSON file and `bench/overhead.py`
read.

Definitions follow `vllm bench serve` (vllm/benchmarks/serve.py, `calculate_metrics`):

- TTFT: send → first chunk that carries output (content, text, reasoning or tool call).
  vLLM counts the first chunk that has `choices` at all, which for chat is the role-only
  chunk with empty content; we wait for output, which is what a user sees as "first token".
- E2E latency: send → the last output-bearing chunk (vLLM's definition: the trailing usage
  chunk and `[DONE]` do not move it). For a non-streamed request: send → whole body read,
  and TTFT = E2E.
- TPOT: (E2E − TTFT) / (output tokens − 1), only for requests with more than one token.
- ITL: every gap between consecutive output-bearing chunks, all requests pooled.
- Output tokens: `usage.completion_tokens` when the server sent usage, else the number of
  output-bearing chunks (one token per chunk, as vLLM's simulator and most servers send).
- Throughputs: completed requests, output tokens and input + output tokens, each divided by
  the run's duration (first send → last completion).
- Percentiles: numpy's linear interpolation, as vLLM uses.

Does not own: sending requests (runner.py), formatting (report.py) or plotting (plots.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What one request saw. Times are seconds; `start` is a perf_counter() reading."""

    start: float = 0.0
    ok: bool = False
    status: int = 0
    error: str | None = None
    error_detail: str | None = None
    ttft: float | None = None
    latency: float | None = None  # send → last output chunk (stream) / body read (non-stream)
    done: float | None = None  # send → response fully read, `[DONE]` included
    itl: list[float] = field(default_factory=list)
    output_chunks: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_seen: bool = False
    bytes_received: int = 0
    # Raw SSE `data:` payloads, only when the run asks for them (the byte-exact relay check).
    chunks: list[bytes] | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values (times in ms), without captured chunks."""
        return {
            "start_s": self.start,
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "error_detail": self.error_detail,
            "ttft_ms": _ms(self.ttft),
            "latency_ms": _ms(self.latency),
            "done_ms": _ms(self.done),
            "tpot_ms": _ms(self.tpot),
            "itl_ms": [round(x * 1000.0, 4) for x in self.itl],
            "output_chunks": self.output_chunks,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "usage_seen": self.usage_seen,
            "bytes_received": self.bytes_received,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of one series, in milliseconds."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> Stats:
        if not values:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        arr = np.asarray(values, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(x) for x in np.percentile(arr, PERCENTILES))
        return cls(
            count=int(arr.size),
            mean=float(arr.mean()),
            std=float(arr.std()),
            min=float(arr.min()),
            max=float(arr.max()),
            p50=p50,
            p90=p90,
            p99=p99,
        )

    def to_json(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "mean": round(self.mean, 4),
            "std": round(self.std, 4),
            "min": round(self.min, 4),
            "max": round(self.max, 4),
            "p50": round(self.p50, 4),
            "p90": round(self.p90, 4),
            "p99": round(self.p99, 4),
        }


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    """The metrics of one run as a JSON-ready dict (latencies in ms, rates per second)."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2els = [r.latency for r in ok if r.latency is not None]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    errors = Counter(r.error or "unknown" for r in records if not r.ok)
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.prompt_tokens for r in ok)
    total_chunks = sum(r.output_chunks for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": round(duration_s, 6),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_output_chunks": total_chunks,
        "usage_reported": sum(1 for r in ok if r.usage_seen),
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "chunk_throughput": total_chunks / dur,
        "ttft_ms": Stats.of_seconds(ttfts).to_json(),
        "tpot_ms": Stats.of_seconds(tpots).to_json(),
        "itl_ms": Stats.of_seconds(itls).to_json(),
        "e2el_ms": Stats.of_seconds(e2els).to_json(),
    }
