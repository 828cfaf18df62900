"""The fleet proof on one H200 (issues 9 and 11; docs/gpu.md, "The fleet on the H200"):
two launched vLLM replicas sharing GPU 0 (`gpu_ids: [0, 0]`) behind `gateway serve
--workers 4` with Redis, LoRA affinity and mid-stream continuation on. Runs ON the GPU
machine after ../shared/gpu/device-setup.sh:

    PYTHONPATH=. python3 bench/gpu_fleet.py --out "$OUT" --deadline EPOCH_S \
        --redis .carry/r/redis-server
    .venv/bin/python bench/gpu_fleet.py --dry-run --out /tmp/fleet   # here, no GPU

Steps (each recorded in results.json; a failing step is recorded and the next one runs):
1. Redis from the carried binary (none on that image); adapters made with peft
   (make_lora.py → four copies a1..a4) while the replicas start.
2. `gateway serve --workers 4`: the control process launches both replicas on fixed ports,
   the four front doors attach to them directly.
3. Throughput at 256 streams, direct vs through the gateway, interleaved D G D G: four
   load generators in both cases (direct: two per worker at c=64; gateway: four at c=64),
   so the client side is the same (generator i sends the prompts of seed 1 + i to every
   target); front doors' CPU seconds per 1,000 requests, each front door's, every kind of
   process's CPU seconds over the run (vLLM engine cores and API servers, front doors,
   load generators, ...) and how many of the machine's CPUs were busy. `--second lean`
   adds a third target, D G L D G L: a second `--workers 4` gateway attached to the same
   replicas with a plain entry (default routing, no LoRA, no continuation);
   `--second shared` (or `--shared-socket`) the same with its front doors on one shared
   listening socket (`GATEWAY_REUSE_PORT=false`). `--router vllm-router` adds the Rust router
   (round-robin over the same replicas) as a target: the control for "any proxy in
   front". `--sampled-direct` adds a direct target whose bodies carry no `temperature`
   (every other target's generators send `temperature: 0`, so the bodies are equal).
   `--request-rate R` makes the load open-loop (R req/s in all, Poisson): below the
   replicas' saturation a proxy should keep the offered rate, and the run compares
   latency.
   `--api-servers N` starts each replica with vLLM's `--api-server-count N` (N API server
   processes on one port; vLLM then refuses runtime LoRA, so the entry has none and only
   this step runs). `--profile-s S` samples every vLLM API server with py-spy for S
   seconds in each target's first round (profiles/, results.json "profiles"): where an
   API server's time goes with and without a proxy in front.
   `--steps throughput` runs only this step (with `lora`, `kill`: those).
4. LoRA affinity: the adapters loaded through one front door (Redis spreads them), then
   requests over a1..a4; where each landed (the access log's `worker`) and the adapters
   each worker holds at the end.
5. Kill: greedy references for 8 prompts, then 24 clients (streams with usage and
   non-streamed, alternating) for `--kill-load-s`; one replica's process group gets SIGKILL
   after a third of it. Counted: non-streamed 200s, streams that end with [DONE] and a
   finish_reason, streams whose text equals the uninterrupted greedy reference, the
   gateway's continuation counter; then the time until the control restarted the replica.

Writes under --out: results.json, gateway.log, workers.log, bench.json, log.txt (caller).
Reuses `gpu_proof.Proof` for the gateway's process, health waits, logs and collection.

Why one file of this size: it is the one script a device call runs, every step a function
in the order it runs; what other GPU scripts share is already elsewhere (the gateway's
process, waits and logs: gpu_proof.py; CPU readings: proc_cpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_proof import ROOT, Proof, log
from proc_cpu import (
    cpu_by_group,
    cpu_s,
    host_facts,
    machine_busy,
    machine_busy_since,
    pids_of,
    wait_cpu_s,
)
from pyspy_profile import record

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Give a short greeting to a new colleague.",
    "List three fruits.",
    "Why is the sky blue? Answer briefly.",
    "Describe a cat in one sentence.",
]
ADAPTERS = ["a1", "a2", "a3", "a4"]
FLEET_YAML = """
models:
  - name: smol
    engine: vllm
    model: /root/smol
    replicas: 2
    max_model_len: 2048
    request_defaults:
      temperature: 0
    request_fields:
      allow_extra: [ignore_eos]   # the load generator's --ignore-eos
    lora:
      max_adapters: 4
      max_rank: 16
      roots: [/root/loras]
    routing:
      scorers: {lora_affinity: 2, least_outstanding: 1}
    # A fixed KV size lets the two replicas on GPU 0 start together (else they start one
    # after the other: engines.launch.engine.LaunchedEngine.start_waves).
    engine_args:
      kv-cache-memory-bytes: 8589934592
    options:
      gpu_ids: [0, 0]
      gpu_memory_share: 0.4
      continue_streams: true
      start_timeout_s: 420
      stop_grace_s: 10
      health_interval_s: 1
      env:
        VLLM_USE_FLASHINFER_SAMPLER: "0"
"""


class Fleet(Proof):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_url = ""
        self.workers_urls: list[str] = []
        self.lora_root = Path("/root/loras")
        self.key = "unused"
        # The comparison gateway (`--second`, step 3): a plain entry on the same replicas.
        self.second: subprocess.Popen[bytes] | None = None
        # `--router`: vllm-router (Rust) in front of the same replicas, a third target.
        self.router: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ set-up

    def env(self) -> dict[str, str]:
        env = super().env()
        env["GATEWAY_REDIS_URL"] = self.redis_url
        env["GATEWAY_REDIS_PREFIX"] = f"fleet-{os.getpid()}"
        # A store call that misses its 50 ms (a loaded 2-core dry run does) decides locally
        # instead of failing the request: this proof is about routing, not the limiter.
        env["GATEWAY_REDIS_OUTAGE"] = "local"
        env["GATEWAY_ACCESS_LOG"] = "true"
        return env

    def start_redis(self) -> None:
        if self.args.dry_run and not self.args.redis:
            self.redis_url = os.environ.get("FLEET_REDIS_URL", "redis://127.0.0.1:6379/0")
            return
        binary = Path(self.args.redis).resolve()
        env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent / "lib"))
        port = "6390"
        self.redis = subprocess.Popen(
            [str(binary), "--port", port, "--save", "", "--appendonly", "no"],
            stdout=(self.work / "redis.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        for _ in range(50):
            time.sleep(0.1)
            if self.redis.poll() is not None:
                raise RuntimeError(
                    f"redis exited {self.redis.returncode}: "
                    + (self.work / "redis.log").read_text(errors="replace")[-500:]
                )
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(("127.0.0.1", int(port)), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        self.redis_url = f"redis://127.0.0.1:{port}/0"
                        return
        raise RuntimeError("redis did not answer PING")

    def prepare(self) -> Path:
        cfg = yaml.safe_load(FLEET_YAML)
        m = cfg["models"][0]
        if self.args.dry_run:
            self.lora_root = self.work / "loras"
        self.lora_root.mkdir(parents=True, exist_ok=True)
        m["lora"]["roots"] = [str(self.lora_root)]
        if self.args.api_servers > 1:
            # vLLM refuses runtime LoRA loading with more than one API server process
            # (vllm/entrypoints/cli/serve.py): this entry serves the base model only.
            m["engine_args"]["api-server-count"] = self.args.api_servers
            m.pop("lora")
            m["routing"]["scorers"] = {"least_outstanding": 1}
        if self.args.dry_run:
            m["engine"] = "sim"
            m.pop("model")
            m.pop("engine_args")
            for key in ("gpu_ids", "gpu_memory_share", "start_timeout_s", "stop_grace_s", "env"):
                m["options"].pop(key, None)
            m["options"].update({"ttft_ms": 20, "itl_ms": 3})
        elif shutil.which("vllm") is None:
            m["options"]["command"] = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        self.models = ["smol"]
        path = self.work / "models.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.results["models_yaml"] = path.read_text()
        return path

    def launch(self, cfg: Path) -> None:
        logf = self.gw_log_path.open("ab")
        self.t_launch = time.time()
        self.gw = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(cfg),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "4",
            ],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )

    def start_shared(self) -> None:
        """A second `gateway serve --workers 4` on port + 1, attached to the same replicas
        (what each front door of the first one is) with a plain entry: default routing
        (`least_outstanding`), no LoRA, no continuation, default health interval. With
        `--second shared` its front doors share one listening socket
        (`GATEWAY_REUSE_PORT=false`, as before SO_REUSEPORT); with `--second lean` each has
        its own SO_REUSEPORT socket, as the first gateway's."""
        cfg = yaml.safe_load(self.results["models_yaml"])
        m = cfg["models"][0]
        entry = {
            "name": "smol",
            # (A dry run's "worker" is the control process, reached as a plain OpenAI
            # server; it wants the control's token, so only the start is proven there.)
            "engine": "openai" if self.args.dry_run else m["engine"],
            "endpoints": self.workers_urls,
            "request_defaults": m["request_defaults"],
            "request_fields": m["request_fields"],
        }
        path = self.work / "shared.yaml"
        path.write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))
        env = self.env()
        if self.args.second == "shared":
            env["GATEWAY_REUSE_PORT"] = "false"
        port = self.port + 1
        self.second = subprocess.Popen(
            [
                *(sys.executable, "-m", "gateway", "serve", "--config", str(path)),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "4"),
            ],
            cwd=ROOT,
            stdout=(self.work / "shared.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        until = time.time() + 90
        while time.time() < until:
            with contextlib.suppress(Exception):
                base = f"http://127.0.0.1:{port}"
                if self.http("GET", "/health/ready", base=base, timeout=2)[0] == 200:
                    time.sleep(3)  # every front door up (each takes its own start)
                    log(f"second gateway ({self.args.second}) ready on {port}")
                    return
            time.sleep(0.5)
        raise RuntimeError("the second gateway did not become ready in 90 s")

    def start_router(self) -> None:
        """vllm-router (the Rust router, `--router` names its executable) on port + 2,
        round-robin over the same two replicas: the control for "does any proxy in front
        change what the replicas do", beside the gateway."""
        port = self.port + 2
        self.router = subprocess.Popen(
            [
                *(self.args.router, "--host", "127.0.0.1", "--port", str(port)),
                *("--worker-urls", *self.workers_urls, "--policy", "round_robin"),
                *("--prometheus-port", str(self.port + 3), "--log-level", "warning"),
            ],
            stdout=(self.work / "router.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        until = time.time() + 60
        while time.time() < until:
            with contextlib.suppress(Exception):
                # Any answer will do: a dry run's worker wants a token the router lacks.
                if self.http("GET", "/health", base=f"http://127.0.0.1:{port}", timeout=2)[0]:
                    log(f"vllm-router ready on {port}")
                    return
            if self.router.poll() is not None:
                break
            time.sleep(0.5)
        tail = (self.work / "router.log").read_text(errors="replace")[-800:]
        raise RuntimeError(f"vllm-router did not become ready: {tail}")

    def adapters_ready(self) -> None:
        """Four adapters: make_lora.py's one, copied under four names (placement is what is
        measured here, not the adapters' effect), in dry runs a fake one."""
        root = self.lora_root
        src = root / "src"
        if self.args.dry_run:
            src.mkdir(parents=True, exist_ok=True)
            (src / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
            (src / "adapter_model.safetensors").write_bytes(b"\0" * 16)
        else:
            self.wait_make_lora()
            src = Path("/root/lora1")
        for name in ADAPTERS:
            dst = root / name
            if not dst.exists():
                shutil.copytree(src, dst)

    # ------------------------------------------------------------------ steps

    def client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key=self.key, timeout=120.0, max_retries=0)

    def create_key(self) -> None:
        """With Redis the gateway checks hashed keys: one key, no limits, for every client."""
        status, _, body = self.http("POST", "/admin/keys", {"name": "fleet-proof"}, admin=True)
        if status != 201:
            raise RuntimeError(f"create key: {status} {body[:300]!r}")
        self.key = json.loads(body)["key"]

    def discover(self) -> None:
        h = json.loads(self.http("GET", "/health", admin=True)[2])
        self.workers_urls = [w["url"] for w in h["models"]["smol"]["workers"]["list"]]
        self.results["health_ready"] = h
        log(f"workers: {self.workers_urls}")

    def front_pids(self) -> list[int]:
        assert self.gw is not None
        return self._doors_of(self.gw.pid)

    @staticmethod
    def _doors_of(root: int) -> list[int]:
        """The front doors (uvicorn's spawned children) below process `root`."""
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            for task in Path(f"/proc/{p}/task").glob("*"):
                with contextlib.suppress(OSError):
                    for c in (task / "children").read_text().split():
                        todo.append(int(c))
                        cmd = Path(f"/proc/{c}/cmdline").read_bytes()
                        if b"spawn_main" in cmd:
                            out.append(int(c))
        return out

    def _bench(
        self, url: str, conc: int, n: int, label: str, seed: int, sampled: bool = False
    ) -> subprocess.Popen[bytes]:
        raw = self.work / "bench"
        raw.mkdir(exist_ok=True)
        a = self.args
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "bench",
                "--base-url",
                url,
                "--model",
                "smol",
                "--stream",
                "--concurrency",
                str(conc),
                # Open loop (`--request-rate`): Poisson arrivals, a quarter per generator,
                # with `conc` as the cap on requests in flight.
                *(("--request-rate", str(a.request_rate / 4)) if a.request_rate else ()),
                "--num-requests",
                str(n),
                "--max-tokens",
                str(a.max_tokens),
                # (The simulator always generates max_tokens and refuses the field.)
                *(() if self.args.dry_run else ("--ignore-eos",)),
                "--prompt-tokens",
                "64",
                "--warmup",
                "4",
                "--seed",
                str(seed),
                # The same bodies for every target: greedy, as the fleet entry's default
                # (without it, vLLM samples a request at temperature 1 while the gateway
                # adds its entry's temperature 0: a different text, a different load).
                # `sampled`: the body without a temperature (the earlier runs' direct).
                *(() if sampled else ("--extra-body", '{"temperature": 0}')),
                "--no-progress",
                "--timeout",
                "120",
                "--json",
                str(raw / f"{label}.json"),
                "--label",
                label,
                "--api-key",
                self.key,
            ],
            cwd=ROOT,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=(raw / f"{label}.err").open("wb"),
        )

    def throughput(self) -> None:
        runs: list[dict[str, Any]] = []
        self.results["throughput"] = {
            "runs": runs,
            "max_tokens": self.args.max_tokens,
            "request_rate": self.args.request_rate or "closed loop",
            "host": host_facts(),
        }
        per = self.args.bench_n // 4
        doors = {"gateway": self.front_pids()}
        controls = {"gateway": self.gw.pid if self.gw is not None else -1}
        targets = ["direct", "gateway"]
        if self.args.sampled_direct:
            targets.insert(1, "direct-sampled")
        if self.router is not None:
            targets.insert(1, "vllm-router")
        if self.second is not None:
            name = f"gateway-{self.args.second}"
            doors[name] = self._doors_of(self.second.pid)
            controls[name] = self.second.pid
            targets.append(name)
        # Leave the later steps their time unless throughput is all this run does.
        reserve = 20 if self.args.steps == "throughput" else self.args.kill_load_s + 150
        for rnd in range(self.args.rounds):
            for target in targets:
                if self.left() < reserve:
                    log(f"throughput: stopping for the deadline ({self.left():.0f} s left)")
                    return
                if target.startswith("direct"):
                    n = len(self.workers_urls)  # two replicas: two load generators each
                    urls = [self.workers_urls[i * n // 4] for i in range(4)]
                elif target == "gateway":
                    urls = [self.base] * 4
                elif target == "vllm-router":
                    urls = [f"http://127.0.0.1:{self.port + 2}"] * 4
                else:
                    urls = [f"http://127.0.0.1:{self.port + 1}"] * 4
                fronts = doors.get(target, [])
                cpu0 = [cpu_s(p) for p in fronts]
                groups0 = cpu_by_group(doors, controls)
                busy0 = machine_busy()
                t0 = time.time()
                labels = [f"{target}-r{rnd}-{i}" for i in range(4)]
                # Generator i sends the same prompts (seed 1 + i) to every target.
                procs = [
                    self._bench(u, 64, per, lab, 1 + i, target == "direct-sampled")
                    for i, (u, lab) in enumerate(zip(urls, labels, strict=True))
                ]
                profiler = self._profile(target) if rnd == 0 and self.args.profile_s else None
                gen_cpu = sum(wait_cpu_s(p, max(30.0, self.left() - 20)) for p in procs)
                if profiler is not None:
                    profiler.join()
                wall = time.time() - t0
                busy = machine_busy_since(busy0)
                groups = {
                    k: round(v - groups0.get(k, 0.0), 2)
                    for k, v in cpu_by_group(doors, controls).items()
                }
                groups["load-generators"] = round(gen_cpu, 2)
                per_door = [round(cpu_s(p) - c, 2) for p, c in zip(fronts, cpu0, strict=True)]
                cpu = sum(per_door)
                summ = [self._summary(lab) for lab in labels]
                done = per * 4
                run = {
                    "target": target,
                    "round": rnd + 1,
                    "wall_s": round(wall, 2),
                    "req_per_s": round(sum(s["req_per_s"] for s in summ), 2),
                    "req_per_s_wall": round(done / wall, 2),
                    "out_tok_per_s": round(sum(s["out_tok_per_s"] for s in summ), 1),
                    "ttft_p50_ms": round(max(s["ttft_p50_ms"] for s in summ), 2),
                    "ttft_p99_ms": round(max(s["ttft_p99_ms"] for s in summ), 2),
                    "itl_p99_ms": round(max(s["itl_p99_ms"] for s in summ), 2),
                    "failed": sum(s["failed"] for s in summ),
                    "e2e_p50_ms": round(max(s["e2e_p50_ms"] for s in summ), 2),
                    "chunks_per_req": round(sum(s["chunks"] for s in summ) / len(summ), 2),
                    "bytes_per_req": round(sum(s["bytes"] for s in summ) / len(summ), 1),
                    "front_door_cpu_s": round(cpu, 2),
                    "front_door_cpu_s_each": sorted(per_door),
                    "front_door_cpu_s_per_1000": round(cpu / max(1, done) * 1000, 2)
                    if fronts
                    else None,
                    # CPU seconds over the run by process kind, and how busy the machine was.
                    "cpu_s_by_group": groups,
                    "machine_busy_cpus": busy,
                }
                runs.append(run)
                log(f"throughput {run}")

    def _profile(self, target: str) -> threading.Thread:
        """py-spy on every vLLM API server for `--profile-s` seconds, from 3 s into the
        target's first round (past the generators' start), into profiles/TARGET-PID.txt
        and results.json's "profiles"."""
        found = self.results.setdefault("profiles", {})

        def run() -> None:
            time.sleep(3.0)
            pids = pids_of("vllm-api-server")
            found[target] = record(pids, self.args.profile_s, self.out / "profiles", target)
            samples = {p: e.get("samples", e.get("error")) for p, e in found[target].items()}
            log(f"profiled {target}: {samples}")

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def _summary(self, label: str) -> dict[str, Any]:
        """One load generator's figures (loadgen's JSON: runs[0].summary)."""
        run = json.loads((self.work / "bench" / f"{label}.json").read_text())["runs"][0]
        s = run["summary"]
        ok = [r for r in run.get("requests", []) if r["ok"]] or [{}]
        return {
            "chunks": sum(r.get("output_chunks", 0) for r in ok) / len(ok),
            "bytes": sum(r.get("bytes_received", 0) for r in ok) / len(ok),
            "req_per_s": float(s["request_throughput"]),
            "out_tok_per_s": float(s["output_throughput"]),
            "ttft_p50_ms": float(s["ttft_ms"]["p50"]),
            "ttft_p99_ms": float(s["ttft_ms"]["p99"]),
            "itl_p99_ms": float(s["itl_ms"]["p99"]),
            "e2e_p50_ms": float(s["e2el_ms"]["p50"]),
            "failed": int(s["failed"]),
        }

    def lora_affinity(self) -> None:
        root = self.lora_root
        for name in ADAPTERS:
            status, _, body = self.http(
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": str(root / name)},
                admin=True,
            )
            if status != 200:
                raise RuntimeError(f"load {name}: {status} {body[:300]!r}")
        time.sleep(2)  # the other front doors follow the store (adapter_sync)
        log_mark = len(self._gw_log_lines())
        errors: list[str] = []
        lock = threading.Lock()
        todo = list(range(self.args.lora_n))

        def client() -> None:
            c = self.client()
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                try:
                    c.chat.completions.create(
                        model=ADAPTERS[i % 4],
                        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        max_tokens=8,
                    )
                except Exception as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:200])

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        landed: dict[str, dict[str, int]] = {}
        for line in self._gw_log_lines()[log_mark:]:
            with contextlib.suppress(ValueError):
                rec = json.loads(line[line.index("{") :])
                name = rec.get("adapter") or rec.get("model")
                if name in ADAPTERS and rec.get("status") == 200:
                    w = str(rec.get("worker"))
                    landed.setdefault(name, {}).setdefault(w, 0)
                    landed[name][w] += 1
        held = {}
        for url in self.workers_urls:
            st, _, body = self.http("GET", "/v1/models", base=url)
            held[url] = sorted(m["id"] for m in json.loads(body)["data"]) if st == 200 else st
        self.results["lora"] = {
            "requests": self.args.lora_n,
            "errors": len(errors),
            "error_samples": errors[:5],
            "landed": landed,
            "held_at_end": held,
            "gateway_adapter_metrics": [
                line
                for line in self.http("GET", "/metrics")[2].decode().splitlines()
                if "adapter" in line and not line.startswith("#")
            ],
        }
        log(f"lora {self.results['lora']}")

    def kill_test(self) -> None:
        refs = {}
        c = self.client()
        for p in PROMPTS:
            r = c.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": p}], max_tokens=96
            )
            refs[p] = r.choices[0].message.content or ""
        stop = time.time() + self.args.kill_load_s
        kill_at = time.time() + self.args.kill_load_s / 3
        lock = threading.Lock()
        counts: dict[str, int] = {}
        samples: list[str] = []

        def bump(key: str, note: str | None = None) -> None:
            with lock:
                counts[key] = counts.get(key, 0) + 1
                if note and len(samples) < 12:
                    samples.append(note[:300])

        def client(k: int) -> None:
            cl = self.client()
            i = k
            while time.time() < stop:
                p = PROMPTS[i % len(PROMPTS)]
                msgs = [{"role": "user", "content": p}]
                i += 1
                if i % 2:
                    try:
                        r = cl.chat.completions.create(model="smol", messages=msgs, max_tokens=96)
                        bump("plain_200")
                        if (r.choices[0].message.content or "") == refs[p]:
                            bump("plain_equal_ref")
                    except Exception as e:
                        bump("plain_failed", f"plain: {type(e).__name__}: {e}")
                    continue
                text, ids, finish, usage = [], set(), None, None
                try:
                    for ch in cl.chat.completions.create(
                        model="smol",
                        messages=msgs,
                        max_tokens=96,
                        stream=True,
                        stream_options={"include_usage": True},
                    ):
                        ids.add(ch.id)
                        if ch.usage is not None:
                            usage = ch.usage
                        for choice in ch.choices:
                            text.append(choice.delta.content or "")
                            finish = choice.finish_reason or finish
                    bump("stream_done" if finish else "stream_no_finish")
                    if len(ids) != 1:
                        bump("stream_many_ids", f"ids {ids}")
                    if usage is None:
                        bump("stream_no_usage")
                    if "".join(text) == refs[p]:
                        bump("stream_equal_ref")
                    else:
                        bump("stream_differs", f"{p!r}: {''.join(text)!r} vs {refs[p]!r}")
                except Exception as e:
                    bump("stream_failed", f"stream: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(24)]
        for t in threads:
            t.start()
        while time.time() < kill_at:
            time.sleep(0.05)
        victim_url = self.workers_urls[0]
        # (A dry run's only "worker" is the control process: nothing is killed.)
        pid = None if self.args.dry_run else self._worker_pid(victim_url)
        killed_at = time.time()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        log(f"killed {victim_url} (pid {pid})")
        for t in threads:
            t.join()
        metrics = [
            line
            for line in self.http("GET", "/metrics")[2].decode().splitlines()
            if ("continu" in line or "retr" in line or "eject" in line) and not line.startswith("#")
        ]
        self.results["kill"] = {
            "victim": victim_url,
            "pid": pid,
            "load_s": self.args.kill_load_s,
            "counts": counts,
            "samples": samples,
            "metrics_one_front_door": metrics,
        }
        log(f"kill counts {counts}")
        back = None
        until = min(self.deadline - 25, killed_at + self.args.restart_wait_s)
        while time.time() < until:
            with contextlib.suppress(Exception):
                h = json.loads(self.http("GET", "/health", admin=True, timeout=3)[2])
                if h["models"]["smol"]["workers"]["healthy"] == len(self.workers_urls):
                    back = round(time.time() - killed_at, 1)
                    break
            time.sleep(1)
        self.results["kill"]["restarted_and_healthy_after_s"] = back
        log(f"victim healthy again after {back} s")

    def run(self) -> int:
        self.step("redis", self.start_redis)
        cfg = self.step("prepare config", self.prepare)
        if cfg is None:
            self.collect()
            return 1
        self.step("gateway check", self.check, cfg)
        with_lora = self.args.api_servers == 1
        if with_lora:
            self.step("make_lora (start)", self.start_make_lora)
        try:
            self.step("start gateway", self.start_gateway, cfg)
            if not self.results["steps"]["start gateway"]["ok"]:
                return 1
            self.step("key", self.create_key)
            self.step("discover", self.discover)
            steps = set(self.args.steps.split(","))
            if with_lora:
                self.step("adapters", self.adapters_ready)
            if self.args.second != "none":
                self.step("second gateway", self.start_shared)
            if self.args.router:
                self.step("vllm-router", self.start_router)
            if steps & {"all", "throughput"}:
                self.step("throughput", self.throughput)
            if steps & {"all", "lora"}:
                self.step("lora affinity", self.lora_affinity)
            if steps & {"all", "kill"}:
                self.step("kill", self.kill_test)
            return 0
        finally:
            if self.second is not None and self.second.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.second.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.second.wait(timeout=20)
            if self.router is not None and self.router.poll() is None:
                self.router.terminate()
            self.step("stop", self.stop_gateway)
            if self.lora_proc is not None and self.lora_proc.poll() is None:
                self.lora_proc.kill()
            if self.redis is not None:
                self.redis.terminate()
            self.collect()
            bench = self.results.get("throughput")
            if bench:
                (self.out / "bench.json").write_text(json.dumps(bench, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-fleet-out"))
    ap.add_argument("--work", help="scratch directory (default: a new temp dir)")
    ap.add_argument("--deadline", type=float, help="epoch seconds by which to be done")
    ap.add_argument("--budget-s", type=float, default=480.0, help="without --deadline")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ready-timeout-s", type=float, default=330.0)
    ap.add_argument("--dry-run", action="store_true", help="simulator instead of vLLM")
    ap.add_argument("--redis", help="a redis-server binary (its libraries in ./lib next to it)")
    ap.add_argument("--bench-n", type=int, default=2048, help="requests per throughput run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--lora-n", type=int, default=400)
    ap.add_argument("--kill-load-s", type=float, default=30.0)
    ap.add_argument(
        "--restart-wait-s",
        type=float,
        default=300.0,
        help="how long to wait for the killed replica to serve again (0: do not wait)",
    )
    ap.add_argument(
        "--steps", default="all", help="comma-separated: throughput, lora, kill (default: all)"
    )
    ap.add_argument(
        "--second",
        choices=["none", "lean", "shared"],
        default="none",
        help="a third throughput target: a second gateway with a plain entry, its front "
        "doors on SO_REUSEPORT sockets (lean) or one shared socket (shared)",
    )
    ap.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="throughput step open-loop: R req/s in all (Poisson, R/4 per generator, each "
        "still capped at 64 in flight); 0 (default): closed loop",
    )
    ap.add_argument(
        "--router",
        help="a vllm-router executable: adds it, in front of the same replicas, as a target",
    )
    ap.add_argument(
        "--sampled-direct",
        action="store_true",
        help="a direct target whose bodies carry no temperature (vLLM samples at 1)",
    )
    ap.add_argument(
        "--api-servers",
        type=int,
        default=1,
        help="vLLM's --api-server-count per replica (> 1: no LoRA, throughput step only)",
    )
    ap.add_argument(
        "--profile-s",
        type=int,
        default=0,
        help="py-spy every vLLM API server for this long in each target's first round",
    )
    ap.add_argument(
        "--shared-socket",
        dest="second",
        action="store_const",
        const="shared",
        help="the same as --second shared",
    )
    args = ap.parse_args()
    if args.api_servers > 1 and args.steps != "throughput":
        ap.error("--api-servers > 1 serves no LoRA: use --steps throughput")
    return Fleet(args).run()


if __name__ == "__main__":
    sys.exit(main())
