"""KV-cache-event routing on the GPU (issue 23's H200 bar): two vLLM replicas of one model
behind one gateway, a multi-turn chat workload over 16 shared system prompts, and three
routing policies in one run — `least_outstanding`, `prefix_affinity` and `kv_cache_hit` —
each measured by vLLM's own prefix-cache counters, TTFT p50/p99 and throughput. Runs ON
the GPU machine after ../shared/gpu/device-setup.sh (as bench/gpu_fleet.py does):

    PYTHONPATH=. python3 bench/gpu_kv_routing.py --out "$OUT" --deadline EPOCH_S
    .venv/bin/python bench/gpu_kv_routing.py --dry-run --out /tmp/kvgpu   # here, no GPU

One gateway serves three model names over the same two replicas (GPU 0, `gpu_ids: [0,
0]`, a fixed 1 GiB KV cache each, so the cache fills and evicts):

    kv   engine vllm, launched: replicas 2 on ports 8100-8101, each started with
         `--kv-events-config` (the gateway's kv_cache_hit scorer; events on 5557-5560);
         routing `kv_cache_hit: 2, least_outstanding: 1`, tokenizer hf (/root/smol)
    pa   engine vllm, attached to the same two URLs: `prefix_affinity: 2,
         least_outstanding: 1`
    lo   engine vllm, attached: `least_outstanding: 1`

Each policy, in an order rotated every round: both replicas' prefix caches emptied
(`POST /reset_prefix_cache`: VLLM_SERVER_DEV_MODE=1; the events say AllBlocksCleared), then
the same workload through the gateway — `--sessions` chats arriving in an open loop at
`--rate` per second (Poisson, the same arrival times for every policy: equal offered load),
each one of 16 system prompts (~`--system-words` words) and `--turns` turns run back to
back, each turn's prompt the previous turns with the model's own answers (greedy,
`--max-tokens`, streamed) and a new user line. Recorded per policy: vLLM's
`prefix_cache_queries` / `prefix_cache_hits` deltas per replica (the hit rate vLLM
itself measured), requests per replica, TTFT p50 / p99 / mean, requests/s and output
tokens/s, the gateway's routing decisions and its KV-event counters.

The dry run replaces vLLM with two simulator processes (prefix caches publishing the same
events) that every model attaches to, restarted between policies (they have no reset
route). Writes results.json (and gateway.log, workers.log) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_proof import ROOT, Proof, log

WORKER_PORTS = (8100, 8101)
EVENTS_BASE = 5557
POLICIES = ("lo", "pa", "kv")
# Made-up words of two or three syllables (a real tokenizer splits each into a few tokens).
WORDS = [
    a + b + c
    for a in ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo")
    for b in ("ren", "sil", "tam", "dor")
    for c in ("", "a", "is")
]


def kv_yaml(dry_run: bool) -> dict[str, Any]:
    urls = [f"http://127.0.0.1:{p}" for p in WORKER_PORTS]
    attach = {"engine": "openai" if dry_run else "vllm", "endpoints": urls}
    common: dict[str, Any] = {
        "max_model_len": 4096,
        "request_defaults": {"temperature": 0},
        "options": {"health_interval_s": 1},
    }
    kv: dict[str, Any] = {
        "name": "kv",
        **common,
        "routing": {
            "scorers": {"kv_cache_hit": 2, "least_outstanding": 1},
            "kv_events": {"tokenizer": "hf", "tokenizer_path": "/root/smol"},
        },
    }
    if dry_run:
        sources = {
            u: {
                "endpoint": f"tcp://127.0.0.1:{EVENTS_BASE + 2 * i}",
                "replay": f"tcp://127.0.0.1:{EVENTS_BASE + 2 * i + 1}",
            }
            for i, u in enumerate(urls)
        }
        kv.update(attach)
        kv["routing"]["kv_events"] = {"tokenizer": "words", "sources": sources}
    else:
        kv.update(
            {
                "engine": "vllm",
                "model": "/root/smol",
                "replicas": 2,
                # A fixed KV size: both replicas start together on GPU 0, and the cache
                # (about 45k tokens of SmolLM2-135M each) fills and evicts under this load.
                "engine_args": {"kv-cache-memory-bytes": 1 << 30},
            }
        )
        kv["routing"]["kv_events"]["base_port"] = EVENTS_BASE
        kv["options"] = {
            **common["options"],
            "base_port": WORKER_PORTS[0],
            "gpu_ids": [0, 0],
            "gpu_memory_share": 0.4,
            "start_timeout_s": 420,
            "stop_grace_s": 10,
            # /reset_prefix_cache between policies.
            "env": {"VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"},
        }
    models = [kv]
    for name, scorers in (
        ("pa", {"prefix_affinity": 2, "least_outstanding": 1}),
        ("lo", {"least_outstanding": 1}),
    ):
        entry = {
            "name": name,
            **attach,
            "served_model_name": "kv",
            **common,
            "routing": {"scorers": scorers},
        }
        if not dry_run:
            # The replicas come up with "kv" (minutes): wait for them, do not fail.
            entry["options"] = {**common["options"], "start_timeout_s": 600}
        models.append(entry)
    return {"models": models}


def workload(seed: int, sessions: int, system_words: int, rate: float) -> list[dict[str, Any]]:
    """Per session: its arrival time, system prompt and user lines."""
    rng = random.Random(seed)
    systems = [
        f"You are assistant number {k}. " + " ".join(rng.choice(WORDS) for _ in range(system_words))
        for k in range(16)
    ]
    t, out = 0.0, []
    for _ in range(sessions):
        t += rng.expovariate(rate)
        users = [" ".join(rng.choice(WORDS) for _ in range(24)) + "?" for _ in range(8)]
        out.append({"at": t, "system": rng.choice(systems), "users": users})
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


class KVRouting(Proof):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.sims: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> Path:
        cfg = kv_yaml(self.args.dry_run)
        if not self.args.dry_run and shutil.which("vllm") is None:
            cfg["models"][0]["options"]["command"] = [
                sys.executable,
                "-m",
                "vllm.entrypoints.cli.main",
            ]
        self.models = [m["name"] for m in cfg["models"]]
        path = self.work / "models.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.results["models_yaml"] = path.read_text()
        return path

    def start_sims(self) -> None:
        """Dry run: the two workers are simulator processes, fresh ones each call."""
        self.stop_sims()
        for i, port in enumerate(WORKER_PORTS):
            argv = [sys.executable, "-m", "simulator", "--port", str(port), "--model", "kv"]
            argv += ["--ttft-ms", "5", "--itl-ms", "2", "--prefix-cache-tokens", "8192"]
            argv += ["--prefill-ms-per-token", "0.05", "--max-model-len", "4096"]
            argv += ["--kv-events-port", str(EVENTS_BASE + 2 * i), "--seed", str(i)]
            self.sims.append(
                subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=self.env(),
                    stdout=(self.work / f"sim{i}.log").open("ab"),
                    stderr=subprocess.STDOUT,
                )
            )
        for port in WORKER_PORTS:
            self.wait_http(f"http://127.0.0.1:{port}", "/health", 30)

    def stop_sims(self) -> None:
        sims, self.sims = self.sims, []
        for p in sims:
            p.terminate()
        for p in sims:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def wait_http(self, base: str, path: str, limit_s: float) -> None:
        end = time.time() + limit_s
        while time.time() < end:
            with contextlib.suppress(OSError, ValueError):
                if self.http("GET", path, base=base, timeout=2)[0] == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{base}{path} did not answer 200 in {limit_s:.0f} s")

    # ------------------------------------------------------------------ one policy

    def fresh_caches(self) -> None:
        if self.args.dry_run:
            self.start_sims()
            # The gateway's health loop sees them again within its interval.
            time.sleep(2.5)
            return
        for port in WORKER_PORTS:
            status, _, body = self.http(
                "POST", "/reset_prefix_cache", base=f"http://127.0.0.1:{port}"
            )
            if status != 200:
                raise RuntimeError(f"reset_prefix_cache on {port}: {status} {body[:200]!r}")

    def worker_counts(self) -> list[dict[str, float]]:
        from engines.upstream.prom_text import sum_samples

        out = []
        for port in WORKER_PORTS:
            _, _, body = self.http("GET", "/metrics", base=f"http://127.0.0.1:{port}", timeout=10)
            m = sum_samples(body.decode(), "vllm:")
            out.append(
                {
                    "queries": m.get("vllm:prefix_cache_queries_total", 0.0),
                    "hits": m.get("vllm:prefix_cache_hits_total", 0.0),
                    "requests": m.get("vllm:request_success_total", 0.0),
                }
            )
        return out

    def gateway_lines(self, model: str) -> list[str]:
        _, _, body = self.http("GET", "/metrics", timeout=10)
        keep = ("gateway_routing_decisions", "gateway_engine_events")
        return [
            line
            for line in body.decode().splitlines()
            if line.startswith(keep) and f'model="{model}"' in line
        ]

    async def drive(self, model: str, work: list[dict[str, Any]]) -> dict[str, Any]:
        import httpx

        a = self.args
        ttfts: list[float] = []
        out_tokens = 0
        errors: list[str] = []
        t0 = time.perf_counter()
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        async with httpx.AsyncClient(base_url=self.base, timeout=120.0, limits=limits) as client:

            async def session(s: dict[str, Any]) -> None:
                nonlocal out_tokens
                await asyncio.sleep(max(0.0, t0 + s["at"] - time.perf_counter()))
                msgs = [{"role": "system", "content": s["system"]}]
                for t in range(a.turns):
                    msgs.append({"role": "user", "content": s["users"][t]})
                    body = {
                        "model": model,
                        "messages": msgs,
                        "max_tokens": a.max_tokens,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    start, first, text = time.perf_counter(), None, []
                    try:
                        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                            if r.status_code != 200:
                                errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                                return
                            async for line in r.aiter_lines():
                                if not line.startswith("data: {"):
                                    continue
                                obj = json.loads(line[6:])
                                for ch in obj.get("choices") or []:
                                    piece = (ch.get("delta") or {}).get("content")
                                    if piece:
                                        if first is None:
                                            first = time.perf_counter() - start
                                        text.append(piece)
                                usage = obj.get("usage")
                                if usage:
                                    out_tokens += int(usage.get("completion_tokens") or 0)
                    except httpx.HTTPError as e:
                        errors.append(f"{type(e).__name__}: {e}")
                        return
                    if first is not None:
                        ttfts.append(first)
                    msgs.append({"role": "assistant", "content": "".join(text)})

            await asyncio.gather(*(session(s) for s in work))
        wall = time.perf_counter() - t0
        return {
            "requests": len(ttfts),
            "errors": len(errors),
            "error_samples": errors[:5],
            "wall_s": round(wall, 2),
            "req_per_s": round(len(ttfts) / wall, 2),
            "out_tok_per_s": round(out_tokens / wall, 1),
            "ttft_p50_ms": round(pct(ttfts, 0.5) * 1e3, 2),
            "ttft_p99_ms": round(pct(ttfts, 0.99) * 1e3, 2),
            "ttft_mean_ms": round(sum(ttfts) / max(1, len(ttfts)) * 1e3, 2),
        }

    def policy(self, model: str, work: list[dict[str, Any]]) -> dict[str, Any]:
        self.fresh_caches()
        before = self.worker_counts()
        row = asyncio.run(self.drive(model, work))
        after = self.worker_counts()
        d = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
        queries = sum(x["queries"] for x in d)
        row["vllm_prefix_hit_rate"] = round(sum(x["hits"] for x in d) / max(1.0, queries), 4)
        row["per_replica"] = d
        reqs = [x["requests"] for x in d]
        row["max_min_requests"] = round(max(reqs) / max(1.0, min(reqs)), 3)
        row["gateway"] = self.gateway_lines(model)
        log(
            f"{model}: hit {row['vllm_prefix_hit_rate']:.1%}  TTFT p50 {row['ttft_p50_ms']} "
            f"p99 {row['ttft_p99_ms']} ms  {row['req_per_s']} req/s  "
            f"{row['out_tok_per_s']} tok/s  per replica {reqs}  errors {row['errors']}"
        )
        return row

    def experiment(self) -> None:
        a = self.args
        work = workload(a.seed, a.sessions, a.system_words, a.rate)
        rows: list[dict[str, Any]] = []
        self.results["kv_routing"] = {
            "sessions": a.sessions,
            "turns": a.turns,
            "rate": a.rate,
            "system_words": a.system_words,
            "max_tokens": a.max_tokens,
            "rounds": rows,
        }
        for r in range(a.rounds):
            order = POLICIES[r % 3 :] + POLICIES[: r % 3]
            for model in order:
                if self.left() < 90:
                    log("out of time: stopping the experiment")
                    return
                rows.append({"round": r, "policy": model, **self.policy(model, work)})

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        cfg = self.step("prepare config", self.prepare)
        if cfg is None:
            self.collect()
            return 1
        self.step("gateway check", self.check, cfg)
        try:
            if self.args.dry_run:
                self.step("simulators", self.start_sims)
            self.step("start gateway", self.start_gateway, cfg)
            if not self.results["steps"]["start gateway"]["ok"]:
                return 1
            self.step("experiment", self.experiment)
            return 0
        finally:
            self.step("stop", self.stop_gateway)
            self.stop_sims()
            self.collect()
            summarise(self.results)


def summarise(results: dict[str, Any]) -> None:
    rows = (results.get("kv_routing") or {}).get("rounds") or []
    print("\npolicy  round  vLLM hit  TTFT p50 ms  TTFT p99 ms  req/s  tok/s  max/min  errors")
    for r in rows:
        print(
            f"{r['policy']:<6}  {r['round']:5d}  {r['vllm_prefix_hit_rate']:8.1%}"
            f"  {r['ttft_p50_ms']:11.1f}  {r['ttft_p99_ms']:11.1f}  {r['req_per_s']:5.1f}"
            f"  {r['out_tok_per_s']:5.0f}  {r['max_min_requests']:7.2f}  {r['errors']:6d}"
        )
    for e in results.get("errors", []):
        print(f"error in {e['step']}: {e['error']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-kv-routing-out"))
    ap.add_argument("--work", help="scratch directory (default: a new temp dir)")
    ap.add_argument("--deadline", type=float, help="epoch seconds by which to be done")
    ap.add_argument("--budget-s", type=float, default=560.0, help="without --deadline")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ready-timeout-s", type=float, default=330.0)
    ap.add_argument("--dry-run", action="store_true", help="simulators instead of vLLM")
    ap.add_argument("--sessions", type=int, default=160)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rate", type=float, default=4.0, help="sessions started per second")
    ap.add_argument("--system-words", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args()
    if args.dry_run:
        args.sessions, args.turns, args.rate = min(args.sessions, 12), min(args.turns, 2), 20.0
    return KVRouting(args).run()


if __name__ == "__main__":
    sys.exit(main())
