"""Human and machine output of a benchmark: the summary table on stdout and the JSON file.

Owns: `format_run()` (one run, in the layout of `vllm bench serve`'s result block),
`format_sweep()` (one line per concurrency level) and `write_json()`.

Does not own: computing the numbers (metrics.py) or plots (plots.py). Plain text, no
colour codes, so the table reads the same in a terminal, a CI log and a pasted issue.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from loadgen.runner import Result

_WIDTH = 52


def _line(label: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<{_WIDTH - 12}}{text:>12}"


def _section(title: str) -> str:
    return f"{title:-^{_WIDTH}}"


def format_run(summary: dict[str, Any]) -> str:
    """One run's result block."""
    s = summary
    mode = "stream" if s["stream"] else "no-stream"
    lines = [
        f"{' Benchmark result ':=^{_WIDTH}}",
        _line("Target:", s["base_url"]),
        _line("Model / endpoint / mode:", f"{s['model']} {s['endpoint']} {mode}"),
        _line("Concurrency / request rate:", f"{s['concurrency']} / {s['request_rate']}"),
        _line("Successful requests:", s["completed"]),
        _line("Failed requests:", s["failed"]),
    ]
    for kind, n in s["errors"].items():
        lines.append(_line(f"  {kind}:", n))
    lines += [
        _line("Benchmark duration (s):", s["duration_s"]),
        _line("Total input tokens:", s["total_input_tokens"]),
        _line("Total generated tokens:", s["total_output_tokens"]),
        _line("Request throughput (req/s):", s["request_throughput"]),
        _line("Output token throughput (tok/s):", s["output_throughput"]),
        _line("Total token throughput (tok/s):", s["total_token_throughput"]),
    ]
    titles = {
        "ttft_ms": "Time to First Token",
        "tpot_ms": "Time per Output Token (excl. 1st token)",
        "itl_ms": "Inter-token Latency",
        "e2el_ms": "End-to-end Latency",
    }
    short = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2el_ms": "E2EL"}
    for key, title in titles.items():
        if key in ("tpot_ms", "itl_ms") and not s["stream"]:
            continue  # one chunk per response: there is nothing between tokens to measure
        st = s[key]
        lines.append(_section(title))
        lines.append(_line(f"Mean {short[key]} (ms):", st["mean"]))
        for p in ("p50", "p90", "p99"):
            lines.append(_line(f"{p.upper()} {short[key]} (ms):", st[p]))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def format_sweep(summaries: list[dict[str, Any]]) -> str:
    """One line per run: the figures that move with concurrency."""
    head = (
        f"{'conc':>5} {'ok':>6} {'fail':>5} {'req/s':>9} {'tok/s':>10} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'TPOT p50':>9} {'E2E p50':>9} {'E2E p99':>9}"
    )
    rows = [head, "-" * len(head)]
    for s in summaries:
        rows.append(
            f"{s['concurrency']:>5} {s['completed']:>6} {s['failed']:>5} "
            f"{s['request_throughput']:>9.1f} {s['output_throughput']:>10.1f} "
            f"{s['ttft_ms']['p50']:>9.2f} {s['ttft_ms']['p99']:>9.2f} "
            f"{s['itl_ms']['p50']:>8.2f} {s['itl_ms']['p99']:>8.2f} "
            f"{s['tpot_ms']['p50']:>9.2f} {s['e2el_ms']['p50']:>9.2f} {s['e2el_ms']['p99']:>9.2f}"
        )
    rows.append("(latencies in ms)")
    return "\n".join(rows)


def results_document(results: list[Result], include_requests: bool = True) -> dict[str, Any]:
    """Everything about a sweep as one JSON-ready dict."""
    return {
        "tool": "gateway bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "runs": [r.to_json(include_requests=include_requests) for r in results],
    }


def write_json(path: str | Path, results: list[Result], include_requests: bool = True) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = results_document(results, include_requests)
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return out
