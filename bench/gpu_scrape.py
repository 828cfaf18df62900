"""Does scraping a vLLM worker's /metrics slow it down? One compiled vLLM replica on the
H200, driven at c=128 three ways, interleaved (A B C A B C):

    A  direct                    two load generators at c=64 on the worker
    B  direct + scraper          the same, while a thread GETs /health and /metrics ten
                                 times a second each (what four front doors and a control
                                 process probing every second did in the fleet run)
    C  gateway, --workers 4      two load generators at c=64 on `gateway serve --workers 4`
                                 attached to the worker, default options (since the scrape
                                 change: /metrics every 15 s when no scorer needs the load)

Reports per run: req/s (sum of the generators' own rates), TTFT p50/p99, e2e p50, and for
B the scrapes done and their mean latency and body size. Runs ON the GPU machine after
../shared/gpu/device-setup.sh (`--dry-run`: the simulator instead of vLLM, here):

    PYTHONPATH=. python3 bench/gpu_scrape.py --out "$OUT" --deadline EPOCH_S
    .venv/bin/python bench/gpu_scrape.py --dry-run --out /tmp/scrape

Why its own file: copied to the GPU machine and run there as one script; the fleet script
(gpu_fleet.py) needs two replicas and three minutes to start, this one one replica.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER_PORT, GATEWAY_PORT = 8100, 8000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except Exception:
        return 0, b""


def wait_ok(url: str, until: float) -> bool:
    while time.time() < until:
        if get(url, 2)[0] == 200:
            return True
        time.sleep(1)
    return False


class Scraper(threading.Thread):
    """GET /health and /metrics `rate` times a second each until stopped."""

    def __init__(self, base: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.base, self.period = base, 1.0 / rate
        self.stop = threading.Event()
        self.scrapes, self.seconds, self.bytes = 0, 0.0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            get(self.base + "/health")
            t1 = time.perf_counter()
            status, body = get(self.base + "/metrics")
            if status == 200:
                self.scrapes += 1
                self.seconds += time.perf_counter() - t1
                self.bytes = len(body)
            self.stop.wait(max(0.0, self.period - (time.perf_counter() - t0)))


def bench(url: str, label: str, n: int, work: Path, dry: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "gateway", "bench", "--base-url", url, "--model", "smol"),
            *("--stream", "--concurrency", "64", "--num-requests", str(n)),
            *("--max-tokens", "128", "--prompt-tokens", "64", "--warmup", "4", "--seed", "1"),
            *(() if dry else ("--ignore-eos",)),
            *("--no-progress", "--json", str(work / f"{label}.json"), "--label", label),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summary(path: Path) -> dict[str, float]:
    s = json.loads(path.read_text())["runs"][0]["summary"]
    return {
        "req_s": float(s["request_throughput"]),
        "ttft_p50": float(s["ttft_ms"]["p50"]),
        "ttft_p99": float(s["ttft_ms"]["p99"]),
        "e2e_p50": float(s["e2el_ms"]["p50"]),
        "failed": int(s["failed"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-scrape"))
    ap.add_argument("--deadline", type=float, default=time.time() + 400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=512, help="requests per load generator")
    ap.add_argument("--rate", type=float, default=10.0, help="scrapes per second in B")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    worker = f"http://127.0.0.1:{WORKER_PORT}"
    gateway = f"http://127.0.0.1:{GATEWAY_PORT}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_USE_FLASHINFER_SAMPLER="0")
    if args.dry_run:
        cmd = [sys.executable, "-m", "simulator", "--port", str(WORKER_PORT), "--model", "smol"]
        cmd += ["--itl-ms", "5", "--output-tokens", "128"]
    else:
        cmd = [
            *("vllm", "serve", "/root/smol", "--served-model-name", "smol"),
            *("--port", str(WORKER_PORT), "--max-model-len", "2048"),
            *("--gpu-memory-utilization", "0.4"),
        ]
    results: dict[str, Any] = {"worker_cmd": cmd, "runs": []}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.time()
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=(out / "worker.log").open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
        cfg = work / "models.yaml"
        entry = {"name": "smol", "engine": "vllm", "endpoints": [worker]}
        entry["request_fields"] = {"allow_extra": ["ignore_eos"]}
        cfg.write_text(json.dumps({"models": [entry]}))
        if not wait_ok(worker + "/health", args.deadline - 90):
            raise RuntimeError("worker not healthy in time")
        results["worker_ready_s"] = round(time.time() - t0, 1)
        log(f"worker ready after {results['worker_ready_s']} s")
        gw_cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
        gw_cmd += ["--port", str(GATEWAY_PORT), "--workers", "4"]
        procs.append(
            subprocess.Popen(
                gw_cmd,
                cwd=ROOT,
                stdout=(out / "gateway.log").open("wb"),
                stderr=subprocess.STDOUT,
                env=dict(env, GATEWAY_DRAIN_ACCEPT_S="0"),
                start_new_session=True,
            )
        )
        if not wait_ok(gateway + "/health/ready", time.time() + 60):
            raise RuntimeError("gateway not ready")
        time.sleep(3)  # every front door up
        for rnd in range(args.rounds):
            for target in ("direct", "direct+scraper", "gateway"):
                if time.time() > args.deadline - 25:
                    log("stopping for the deadline")
                    return 0
                url = gateway if target == "gateway" else worker
                scraper = Scraper(worker, args.rate) if target == "direct+scraper" else None
                if scraper:
                    scraper.start()
                labels = [f"{target}-r{rnd}-{i}" for i in range(2)]
                gens = [bench(url, lab, args.n, work, args.dry_run) for lab in labels]
                for g in gens:
                    g.wait(timeout=max(10.0, args.deadline - time.time()))
                if scraper:
                    scraper.stop.set()
                    scraper.join()
                ss = [summary(work / f"{lab}.json") for lab in labels]
                run: dict[str, Any] = {
                    "target": target,
                    "round": rnd + 1,
                    "req_s": round(sum(s["req_s"] for s in ss), 1),
                    "ttft_p50_ms": round(max(s["ttft_p50"] for s in ss), 1),
                    "ttft_p99_ms": round(max(s["ttft_p99"] for s in ss), 1),
                    "e2e_p50_ms": round(max(s["e2e_p50"] for s in ss), 1),
                    "failed": sum(int(s["failed"]) for s in ss),
                }
                if scraper:
                    run["scrapes"] = scraper.scrapes
                    run["scrape_mean_ms"] = round(
                        1000 * scraper.seconds / max(1, scraper.scrapes), 2
                    )
                    run["metrics_bytes"] = scraper.bytes
                results["runs"].append(run)
                log(json.dumps(run))
        return 0
    except Exception as e:
        results["error"] = f"{type(e).__name__}: {e}"
        log(results["error"])
        return 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
