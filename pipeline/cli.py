"""Argument parsing for `gateway merge`, `gateway eval`, `gateway quantize` and
`gateway awq-export`.

Owns the four sub-parsers (added to `gateway`'s own parser by `add_commands`) and
turning their arguments into calls of `pipeline.merge`, `pipeline.evaluate`,
`pipeline.quantize` and `pipeline.awq_export`, with the exit statuses: 0 done, 1 the work
failed, 2 a refused argument or environment (one line on stderr). Imports nothing heavy
at module level: `gateway` imports this for every sub-command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("merge", "eval", "quantize", "awq-export")
BUNDLED_TASKS = Path(__file__).parent / "tasks" / "basic.jsonl"


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge.add_argument("base", help="base model: checkpoint dir, hub id, .gguf or pypi: ref")
    merge.add_argument("adapter", type=Path, help="PEFT LoRA adapter directory")
    merge.add_argument("--out", type=Path, required=True, help="directory to write")
    merge.add_argument("--force", action="store_true", help="replace a non-empty --out")

    ev = sub.add_parser("eval", help="score served models on a JSONL task set")
    ev.add_argument("--base-url", required=True, help="OpenAI-compatible server, e.g. the gateway")
    ev.add_argument("--model", required=True, help="model name(s), comma-separated")
    ev.add_argument(
        "--task",
        type=Path,
        default=BUNDLED_TASKS,
        help=f"JSONL task file (default: bundled {BUNDLED_TASKS.name})",
    )
    ev.add_argument("--concurrency", type=int, default=8)
    ev.add_argument("--json", type=Path, help="write the full report here")
    ev.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    ev.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var with the API key")
    ev.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("quantize", help="quantize a checkpoint with llm-compressor (GPU)")
    q.add_argument("model", help="checkpoint dir, hub id, .gguf or pypi: ref")
    q.add_argument("--method", required=True, help="awq, gptq or fp8")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument(
        "--scheme",
        help="awq: W4A16_ASYM|W4A16; gptq: W4A16|W4A16_ASYM|W8A16; "
        "fp8: FP8 (static)|FP8_DYNAMIC|FP8_BLOCK",
    )
    q.add_argument(
        "--calib",
        type=Path,
        help="calibration .jsonl ({text} or {messages}) or text file (default: the bundled set)",
    )
    q.add_argument("--num-samples", type=int, default=64)
    q.add_argument("--max-seq-len", type=int, default=512)
    q.add_argument("--group-size", type=int, help="128, 64, 32 or -1 (default: largest that fits)")
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    q.add_argument("--cpu", action="store_true", help="allow calibrating on CPU (small models)")

    x = sub.add_parser(
        "awq-export",
        help="rewrite a compressed-tensors W4A16 checkpoint in AutoAWQ format (for LMDeploy)",
    )
    x.add_argument("src", type=Path, help="checkpoint written by `gateway quantize --method awq`")
    x.add_argument("--out", type=Path, required=True, help="directory to write")
    x.add_argument("--force", action="store_true", help="replace a non-empty --out")
    x.add_argument(
        "--allow-rounded-scales",
        action="store_true",
        help="round scales that are not exact in fp16 instead of refusing",
    )


def _merge(args: argparse.Namespace) -> int:
    from pipeline.merge import MergeError, merge

    try:
        out = merge(
            args.base,
            args.adapter,
            args.out,
            cache_dir=args.cache_dir,
            overwrite=args.force,
            progress=lambda line: print(line, flush=True),
        )
    except MergeError as e:
        print(f"gateway merge: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.evaluate import EvalError, evaluate, load_tasks, table

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    try:
        if not models:
            raise EvalError("--model names no model")
        if len(set(models)) != len(models):
            raise EvalError("--model names a model twice")
        if args.concurrency < 1:
            raise EvalError("--concurrency must be at least 1")
        if not args.base_url.startswith(("http://", "https://")):
            raise EvalError("--base-url must be an http(s) URL")
        items = load_tasks(args.task)
    except EvalError as e:
        print(f"gateway eval: {e}", file=sys.stderr)
        return 2
    report = asyncio.run(
        evaluate(
            args.base_url,
            models,
            items,
            concurrency=args.concurrency,
            api_key=os.environ.get(args.api_key_env),
            timeout_s=args.timeout_s,
            progress=not args.no_progress,
        )
    )
    report["task"] = str(args.task)
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(len(r["errors"]) for r in report["models"].values())
    return 1 if failed == len(items) * len(models) else 0


def _quantize(args: argparse.Namespace) -> int:
    from pipeline.quantize import QuantizeError, check_request, quantize

    try:
        req = check_request(
            args.model,
            args.method,
            args.out,
            scheme=args.scheme,
            calib=args.calib,
            num_samples=args.num_samples,
            max_seq_len=args.max_seq_len,
            group_size=args.group_size,
            force=args.force,
            allow_cpu=args.cpu,
        )
        record = quantize(req, cache_dir=args.cache_dir, progress=lambda s: print(s, flush=True))
    except QuantizeError as e:
        print(f"gateway quantize: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


def _awq_export(args: argparse.Namespace) -> int:
    from pipeline.awq_export import AwqExportError, export_autoawq

    try:
        record = export_autoawq(
            args.src,
            args.out,
            force=args.force,
            allow_rounded_scales=args.allow_rounded_scales,
            progress=lambda s: print(s, flush=True),
        )
    except AwqExportError as e:
        print(f"gateway awq-export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


def run(args: argparse.Namespace, cache_dir: Path) -> int:
    """Run the parsed sub-command; `cache_dir` is where converted models are cached (the
    caller's setting: the pipeline reads no gateway configuration itself)."""
    args.cache_dir = cache_dir
    commands = {"merge": _merge, "eval": _eval, "quantize": _quantize, "awq-export": _awq_export}
    return commands[args.command](args)
