"""The `gateway bench` sub-command: arguments, the sweep over concurrency levels, output.

Owns: `add_arguments(parser)` and `run(args) -> int`, which the `gateway` CLI wires to
`gateway bench`, and `main()` for `python -m loadgen`. Each concurrency level is
one `run_load()` call; results print as they finish, then the sweep table, the JSON file
and the plots.

Does not own: the load loop (runner.py), the numbers (metrics.py), formatting
(report.py), plots (plots.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from loadgen.report import format_run, format_sweep, write_json
from loadgen.runner import LoadConfig, Result, run_load


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency values must be integers ≥ 1")
    return values


def _rate(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError("request rate must be > 0 (or inf)")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gateway bench` flags."""
    parser.description = (
        "Load-test an OpenAI-compatible server: TTFT, TPOT, ITL and end-to-end latency "
        "(definitions of `vllm bench serve`), throughput and errors, per concurrency level."
    )
    target = parser.add_argument_group("target")
    target.add_argument(
        "--base-url",
        required=True,
        help="server root, with or without /v1 (e.g. http://127.0.0.1:8000)",
    )
    target.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    target.add_argument(
        "--model",
        default=None,
        help="model name to send (default: the first one GET /v1/models lists)",
    )
    target.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="/v1/chat/completions or /v1/completions (default: chat)",
    )
    target.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="NAME:VALUE",
        help="extra request header (repeatable)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream responses (default) or not",
    )
    load.add_argument(
        "--concurrency",
        type=_concurrency_list,
        default=[1],
        metavar="N[,N...]",
        help="max requests in flight; a comma list runs a sweep (default: 1)",
    )
    load.add_argument(
        "--request-rate",
        type=_rate,
        default=math.inf,
        metavar="R",
        help="Poisson arrivals at R req/s; inf = as fast as concurrency allows (default: inf)",
    )
    bound = load.add_mutually_exclusive_group()
    bound.add_argument(
        "--num-requests",
        type=int,
        default=None,
        metavar="N",
        help="requests per level (default: max(200, 4 x concurrency))",
    )
    bound.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="send for S seconds per level instead of a count",
    )
    load.add_argument(
        "--prompt-tokens",
        type=int,
        default=32,
        metavar="P",
        help="approximate prompt length of the synthetic prompt (default: 32)",
    )
    load.add_argument(
        "--align-prompts",
        action="store_true",
        help="make every prompt exactly --prompt-tokens long as the target's POST /tokenize "
        "counts it (the gateway's or vLLM's; chat: with its template, as billed)",
    )
    load.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        metavar="T",
        help="max_tokens per request (default: 64)",
    )
    load.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos=true (vLLM: always generate max_tokens)",
    )
    load.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        metavar="JSON",
        help="JSON object merged into every request body",
    )
    load.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="N",
        help="requests sent and discarded before each level (default: 0)",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="per-request timeout in seconds (default: 600)",
    )
    load.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals")

    out = parser.add_argument_group("output")
    out.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write every run's summary and per-request records here",
    )
    out.add_argument(
        "--plot-dir",
        default=None,
        metavar="DIR",
        help="write latency.png and throughput.png against concurrency here",
    )
    out.add_argument("--label", default="", help="name for this target in output and plots")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_for(args: argparse.Namespace, concurrency: int) -> LoadConfig:
    return LoadConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        stream=args.stream,
        concurrency=concurrency,
        request_rate=args.request_rate,
        num_requests=args.num_requests,
        duration_s=args.duration,
        prompt_tokens=args.prompt_tokens,
        align_prompts=args.align_prompts,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        warmup=args.warmup,
        seed=args.seed,
        timeout_s=args.timeout,
        extra_body=dict(args.extra_body),
        extra_headers=dict(args.header),
        progress=not args.no_progress and sys.stderr.isatty(),
        label=args.label or f"c={concurrency}",
    )


async def _sweep(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    for concurrency in args.concurrency:
        result = await run_load(config_for(args, concurrency))
        print(format_run(result.summary()), flush=True)
        results.append(result)
    return results


def _event_loop_runner() -> asyncio.Runner:
    """uvloop when installed: the client's own per-request cost is part of what we measure."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run(args: argparse.Namespace) -> int:
    """Run `gateway bench`; 0 when every level had at least one successful request."""
    try:
        with _event_loop_runner() as runner:
            results = runner.run(_sweep(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a setup failure (unreachable server, no model): say it plainly
        print(f"gateway bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    summaries = [r.summary() for r in results]
    if len(results) > 1:
        print()
        print(format_sweep(summaries))
    if args.json:
        path = write_json(args.json, results)
        print(f"wrote {path}")
    if args.plot_dir:
        from loadgen.plots import plot_sweep

        for path in plot_sweep({args.label: summaries}, args.plot_dir):
            print(f"wrote {path}")
    return 0 if all(s["completed"] > 0 for s in summaries) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))
