"""The GPU proof: the gateway launches real vLLM workers on an H200 and is driven with the
official `openai` SDK. Runs ON the GPU machine (see docs/gpu.md for the exact call).

    PYTHONPATH=. python3 bench/gpu_proof.py --out "$OUT" --deadline EPOCH_S
    .venv/bin/python bench/gpu_proof.py --dry-run --out /tmp/proof   # here, no GPU

Steps, each independent (an exception is recorded in the results and the next step runs):

1. `gateway check` of deploy/gpu/models.yaml (the exact vLLM command lines), then
   `gateway serve` with it: three vLLM workers (plain bf16 with LoRA, fp8, ngram) start
   side by side; cold start is timed to /health and to the first streamed token. If the
   gateway fails to start because one model failed, it is started again without that model
   while time allows (recorded).
2. Chat, streamed and not, on every model ("What is the capital of France?").
3. ngram speculative decoding: prompts with repeats; acceptance from the worker's
   `vllm:spec_decode_num_{accepted,draft}_tokens_total` (before/after delta) and from the
   gateway's `gateway_worker_spec_decode_acceptance_ratio`.
4. LoRA: an adapter made with peft here (`make_lora.py 1.0` → /root/lora1), loaded through
   `POST /v1/load_lora_adapter`, listed in /v1/models with its parent, used (greedy output
   compared with the base model's), unloaded (then 404); load/unload timed, twice.
5. Overhead on real vLLM: `gateway bench` direct to the worker vs through the gateway,
   streamed, interleaved D G D G at concurrency 64 and 1, while the deadline allows.

Writes under --out (at most 8 files, as the device tool returns): results.json, gateway.log,
workers.log (tails of every worker log), bench.json (summaries), bench_raw.tar.gz, plus the
caller's log.txt. `--dry-run` swaps `engine: vllm` for the simulator (`engine: sim`) and a
fake adapter, so the script itself is tested without a GPU.

Does not own: the bundle and its setup (../shared/gpu), the gateway or the load generator.
Everything it starts is stopped before it exits.

Why one file of this size: it is copied to a GPU machine and run there as one script; every
step is a function, in the order it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_cpu import cpu_s as _cpu_s

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
ADMIN_KEY = "proof-admin-key"
REPEAT_PROMPTS = [
    "Repeat this list exactly, once, and nothing else: apple, banana, cherry, date, "
    "elderberry, fig, grape, honeydew, kiwi, lemon, mango, nectarine, orange, papaya.",
    "Copy the following text exactly: The quick brown fox jumps over the lazy dog. "
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "Repeat this list exactly: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, "
    "Sunday, Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "Repeat exactly: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20.",
    "Repeat this sentence three times: Paris is the capital of France and Berlin is the "
    "capital of Germany.",
    "Write the following code again exactly: def add(a, b):\n    return a + b\n\n"
    "def sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n",
]
LORA_PROMPT = "Name three colours of the rainbow."

# The optional LMDeploy part (PyTorch engine; TurboMind's extension needs CUDA 12
# libraries the H200 image lacks): the add-on bundle unpacks to /root/lmd, which is kept
# off the gateway's own path and given to the worker alone.
LMDEPLOY_YAML = """
models:
  - name: smol-lmdeploy
    engine: lmdeploy
    model: /root/smol
    max_model_len: 2048
    request_defaults:
      temperature: 0
    options:
      backend: pytorch
      cache_max_entry_count: 0.3
      command: [python3, -m, lmdeploy]
      start_timeout_s: 300
      stop_grace_s: 15
      health_interval_s: 2
      env:
        PYTHONPATH: /root/lmd/site:/root/lmd/dep
        HF_HUB_OFFLINE: "1"
"""

T_START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:6.1f}s] {msg}", flush=True)


class Proof:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu-proof-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = self.work / "gw-cache"
        self.deadline = float(args.deadline or (time.time() + args.budget_s))
        self.port = args.port
        self.base = f"http://127.0.0.1:{self.port}"
        self.results: dict[str, Any] = {
            "dry_run": args.dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "deadline_in_s": round(self.deadline - time.time(), 1),
            "errors": [],
            "steps": {},
        }
        self.gw: subprocess.Popen[bytes] | None = None
        self.gw_log_path = self.work / "gateway.log"
        self.lora_proc: subprocess.Popen[bytes] | None = None
        self.lora_path = "/root/lora1"
        self.models: list[str] = []
        self.t_launch = 0.0

    # ------------------------------------------------------------------ helpers

    def left(self) -> float:
        return self.deadline - time.time()

    def step(self, name: str, fn: Any, *a: Any) -> Any:
        log(f"=== {name}")
        t0 = time.time()
        try:
            res = fn(*a)
            self.results["steps"][name] = {"ok": True, "took_s": round(time.time() - t0, 2)}
            return res
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            log(f"!!! {name} failed: {text}")
            self.results["steps"][name] = {
                "ok": False,
                "took_s": round(time.time() - t0, 2),
                "error": text,
            }
            self.results["errors"].append(
                {"step": name, "error": text, "trace": traceback.format_exc()[-3000:]}
            )
            return None

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        admin: bool = False,
        timeout: float = 30.0,
        base: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = (base or self.base) + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if admin:
            req.add_header("Authorization", f"Bearer {ADMIN_KEY}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key="unused", timeout=120.0, max_retries=0)

    # ------------------------------------------------------------------ config

    def prepare(self) -> Path:
        if self.args.lmdeploy:
            cfg = yaml.safe_load(LMDEPLOY_YAML)
        else:
            cfg = yaml.safe_load(Path(self.args.config).read_text())
        if self.args.dry_run:
            root = self.work / "adapters"
            fake = root / "lora1"
            fake.mkdir(parents=True, exist_ok=True)
            (fake / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
            (fake / "adapter_model.safetensors").write_bytes(b"\0" * 16)
            self.lora_path = str(fake)
            for m in cfg["models"]:
                m["engine"] = "sim"
                m.pop("engine_args", None)
                m.pop("model", None)
                opts = m.setdefault("options", {})
                for key in (
                    "stop_grace_s",
                    "env",
                    "command",
                    "gpu_ids",
                    "base_port",
                    "backend",
                    "cache_max_entry_count",
                ):
                    opts.pop(key, None)
                opts.update({"ttft_ms": 20, "itl_ms": 3})
                if m.get("lora"):
                    m["lora"]["roots"] = [str(root)]
        elif not self.args.lmdeploy and shutil.which("vllm") is None:
            # The console script is missing from PATH: run vLLM's CLI module instead.
            for m in cfg["models"]:
                m.setdefault("options", {})["command"] = [
                    sys.executable,
                    "-m",
                    "vllm.entrypoints.cli.main",
                ]
            self.results["vllm_program"] = "python3 -m vllm.entrypoints.cli.main"
        self.models = [m["name"] for m in cfg["models"]]
        path = self.work / "models.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.results["models_yaml"] = path.read_text()
        return path

    def check(self, cfg: Path) -> None:
        p = subprocess.run(
            [sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(),
        )
        self.results["gateway_check"] = {
            "rc": p.returncode,
            "stdout": p.stdout,
            "stderr": p.stderr[-2000:],
        }
        print(p.stdout + p.stderr, flush=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": str(ROOT)
                + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
                "PYTHONUNBUFFERED": "1",
                "GATEWAY_ADMIN_KEY": ADMIN_KEY,
                "GATEWAY_CACHE_DIR": str(self.cache),
                "GATEWAY_LOG_LEVEL": "info",
                "HF_HUB_OFFLINE": "1",
                "VLLM_USE_FLASHINFER_SAMPLER": "0",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        return env

    # ------------------------------------------------------------------ adapter (peft)

    def start_make_lora(self) -> None:
        if self.args.dry_run:
            return
        script = ROOT / ".carry" / "s" / "make_lora.py"
        logf = (self.work / "make_lora.log").open("wb")
        # CPU-only (transformers loads to CPU): it runs while the vLLM workers start.
        self.lora_proc = subprocess.Popen(
            [sys.executable, str(script), "1.0"],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )

    def wait_make_lora(self) -> None:
        if self.lora_proc is None:
            return
        try:
            rc = self.lora_proc.wait(timeout=max(5.0, min(120.0, self.left() - 60)))
        except subprocess.TimeoutExpired:
            self.lora_proc.kill()
            rc = -9
        text = (self.work / "make_lora.log").read_text(errors="replace")
        tail = "\n".join(line for line in text.splitlines() if "cutlass_dsl" not in line)[-1500:]
        self.results["make_lora"] = {"rc": rc, "output": tail}
        log(f"make_lora.py rc={rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
        if rc != 0:
            raise RuntimeError(f"make_lora.py exited {rc}")

    # ------------------------------------------------------------------ gateway

    def launch(self, cfg: Path) -> None:
        logf = self.gw_log_path.open("ab")
        logf.write(f"\n=== gateway serve --config {cfg}\n".encode())
        logf.flush()
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
            ],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )

    def wait_ready(self, limit_s: float) -> bool:
        assert self.gw is not None
        end = time.time() + limit_s
        next_note = time.time() + 10
        while time.time() < end:
            if self.gw.poll() is not None:
                log(f"gateway exited with {self.gw.returncode} before it was ready")
                return False
            with contextlib.suppress(OSError, ValueError):
                status, _, _ = self.http("GET", "/health", timeout=2)
                if status == 200:
                    return True
            if time.time() >= next_note:
                last = self._gw_log_lines()[-1:] or [""]
                log(
                    f"waiting for the gateway ({time.time() - self.t_launch:.0f} s): "
                    f"{last[0][:160]}"
                )
                next_note += 10
            time.sleep(0.5)
        log(f"gateway not ready after {limit_s:.0f} s")
        return False

    def _gw_log_lines(self) -> list[str]:
        try:
            return self.gw_log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def start_gateway(self, cfg: Path) -> None:
        attempts: list[dict[str, Any]] = []
        self.results["start"] = {"attempts": attempts}
        current = cfg
        while True:
            self.launch(current)
            limit = min(self.args.ready_timeout_s, self.left() - 60)
            ok = self.wait_ready(limit)
            took = time.time() - self.t_launch
            attempt: dict[str, Any] = {
                "config_models": list(self.models),
                "ok": ok,
                "seconds": round(took, 1),
            }
            attempts.append(attempt)
            if ok:
                log(f"gateway ready {took:.1f} s after launch")
                self.results["start"]["launch_to_ready_s"] = round(took, 1)
                ready = {}
                for line in self._gw_log_lines():
                    m = re.search(r"model '([^']+)' ready in ([\d.]+) s", line)
                    if m:
                        ready[m.group(1)] = float(m.group(2))
                    m = re.search(r"(\S+\[\d+\]) healthy at (\S+) after (\d+) s", line)
                    if m:
                        attempt.setdefault("workers_healthy", []).append(line.strip()[-160:])
                self.results["start"]["model_ready_s"] = ready
                return
            # Why: the lines naming the failing model, then try without it if time allows.
            lines = self._gw_log_lines()
            attempt["log_tail"] = "\n".join(lines[-80:])
            self.stop_gateway()
            failed = sorted(
                {
                    m.group(1)
                    for line in lines
                    for m in [re.search(r"model '([^']+)' failed to start", line)]
                    if m
                }
            )
            attempt["failed_models"] = failed
            keep = [n for n in self.models if n not in failed]
            if not failed or not keep or self.left() < 260:
                raise RuntimeError(
                    f"gateway did not become ready (failed: {failed or '?'}); see gateway.log"
                )
            log(f"retrying without {failed}")
            data = yaml.safe_load(current.read_text())
            data["models"] = [m for m in data["models"] if m["name"] in keep]
            self.models = keep
            current = self.work / f"models-retry{len(attempts)}.yaml"
            current.write_text(yaml.safe_dump(data, sort_keys=False))

    def stop_gateway(self) -> None:
        gw, self.gw = self.gw, None
        if gw is None:
            return
        t0 = time.time()
        if gw.poll() is None:
            # SIGINT: uvicorn shuts down gracefully; the lifespan drains every worker.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(gw.pid, signal.SIGINT)
            try:
                gw.wait(timeout=45)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gw.pid, signal.SIGKILL)
                gw.wait(timeout=10)
        self.results.setdefault("stop", []).append(
            {"rc": gw.returncode, "seconds": round(time.time() - t0, 1)}
        )
        log(f"gateway stopped (rc {gw.returncode}) in {time.time() - t0:.1f} s")
        # Workers live in their own sessions: if the gateway died hard they may remain.
        # Kill only processes whose command line is one the gateway launched from our config.
        leftovers = self._our_workers()
        if leftovers:
            log(f"killing leftover worker processes {leftovers}")
            self.results.setdefault("leftover_workers_killed", []).extend(leftovers)
            for pid in leftovers:
                # Each worker leads its own process group (its engine-core children too).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)

    def _worker_pid(self, url: str) -> int | None:
        """The pid of the worker process listening at `url` (its --port), if found."""
        port = url.rsplit(":", 1)[-1].strip("/")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for i, arg in enumerate(args[:-1]):
                if arg in (b"--port", b"--server-port") and args[i + 1] == port.encode():
                    return int(entry.name)
        return None

    def _our_workers(self) -> list[int]:
        if self.args.dry_run:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if (
                "/root/smol" in cmd
                and ("vllm" in cmd or "lmdeploy" in cmd)
                and ("--served-model-name" in cmd or "--model-name" in cmd)
            ):
                pids.append(int(entry.name))
        return pids

    def health(self) -> dict[str, Any]:
        status, _, body = self.http("GET", "/health")
        doc: dict[str, Any] = json.loads(body)
        self.results["health"] = {"status": status, "body": doc}
        log(f"/health {status}: {json.dumps(doc)[:600]}")
        return doc

    def worker_url(self, model: str) -> str | None:
        doc = self.results.get("health", {}).get("body", {})
        workers = doc.get("models", {}).get(model, {}).get("workers", [])
        return workers[0]["url"] if workers else None

    # ------------------------------------------------------------------ 2. chat

    def chat_all(self) -> None:
        out: dict[str, Any] = {}
        self.results["chat"] = out
        client = self.client()
        for model in self.models:
            rec: dict[str, Any] = {}
            out[model] = rec
            try:
                t0 = time.perf_counter()
                stream = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=48,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                parts: list[str] = []
                ttft = None
                usage = None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                            if "first_token_after_launch_s" not in self.results["start"]:
                                self.results["start"]["first_token_after_launch_s"] = round(
                                    time.time() - self.t_launch, 1
                                )
                                self.results["start"]["first_token_model"] = model
                        parts.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        usage = chunk.usage.model_dump()
                rec["stream"] = {
                    "text": "".join(parts),
                    "ttft_s": round(ttft or -1, 4),
                    "total_s": round(time.perf_counter() - t0, 4),
                    "chunks": len(parts),
                    "usage": usage,
                }
                log(f"{model} streamed (TTFT {ttft or -1:.3f} s): {''.join(parts)!r}")
            except Exception as exc:
                rec["stream_error"] = f"{type(exc).__name__}: {exc}"
                self.results["errors"].append(
                    {"step": f"chat {model} stream", "error": rec["stream_error"]}
                )
                log(f"!!! {model} stream: {rec['stream_error']}")
            try:
                t0 = time.perf_counter()
                resp = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=48,
                    temperature=0,
                )
                took = time.perf_counter() - t0
                text = resp.choices[0].message.content
                rec["whole"] = {
                    "text": text,
                    "seconds": round(took, 4),
                    "finish_reason": resp.choices[0].finish_reason,
                    "usage": resp.usage.model_dump() if resp.usage else None,
                    "model": resp.model,
                    "id": resp.id,
                }
                log(f"{model} whole ({took:.3f} s): {text!r}")
            except Exception as exc:
                rec["whole_error"] = f"{type(exc).__name__}: {exc}"
                self.results["errors"].append(
                    {"step": f"chat {model} whole", "error": rec["whole_error"]}
                )
                log(f"!!! {model} whole: {rec['whole_error']}")

    # ------------------------------------------------------------------ 3. ngram

    def worker_metrics(self, url: str) -> dict[str, float]:
        from engines.upstream.prom_text import sum_samples

        _, _, body = self.http("GET", "/metrics", base=url, timeout=10)
        return sum_samples(body.decode(), "vllm:spec_decode")

    def gateway_metric(self, name: str) -> list[str]:
        _, _, body = self.http("GET", "/metrics", timeout=10)
        return [line for line in body.decode().splitlines() if line.startswith(name)]

    def ngram(self) -> None:
        model = "smol-ngram"
        if model not in self.models:
            raise RuntimeError(f"{model} is not served")
        url = self.worker_url(model)
        if url is None:
            raise RuntimeError(f"no worker URL for {model}")
        rec: dict[str, Any] = {"worker": url}
        self.results["ngram"] = rec
        before = self.worker_metrics(url)
        rec["metrics_before"] = before
        client = self.client()
        outs = []
        t0 = time.perf_counter()
        for prompt in REPEAT_PROMPTS:
            t1 = time.perf_counter()
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=128,
                temperature=0,
            )
            text = resp.choices[0].message.content or ""
            toks = resp.usage.completion_tokens if resp.usage else None
            outs.append(
                {
                    "prompt": prompt,
                    "text": text,
                    "completion_tokens": toks,
                    "seconds": round(time.perf_counter() - t1, 4),
                }
            )
            log(f"ngram {toks} tok in {time.perf_counter() - t1:.3f} s: {text[:100]!r}")
        rec["requests"] = outs
        rec["requests_seconds"] = round(time.perf_counter() - t0, 3)
        after = self.worker_metrics(url)
        rec["metrics_after"] = after
        acc_k, draft_k = (
            "vllm:spec_decode_num_accepted_tokens_total",
            "vllm:spec_decode_num_draft_tokens_total",
        )
        acc = after.get(acc_k, 0.0) - before.get(acc_k, 0.0)
        draft = after.get(draft_k, 0.0) - before.get(draft_k, 0.0)
        drafts_k = "vllm:spec_decode_num_drafts_total"
        drafts = after.get(drafts_k, 0.0) - before.get(drafts_k, 0.0)
        rec["accepted_tokens"] = acc
        rec["draft_tokens"] = draft
        rec["drafts"] = drafts
        rec["acceptance_ratio"] = round(acc / draft, 4) if draft else None
        rec["mean_acceptance_length"] = round(1 + acc / drafts, 3) if drafts else None
        log(
            f"ngram: accepted {acc:.0f} of {draft:.0f} draft tokens "
            f"({rec['acceptance_ratio']}), {drafts:.0f} drafts, "
            f"mean acceptance length {rec['mean_acceptance_length']}"
        )
        # The gateway scrapes worker metrics every health_interval_s (2 s in models.yaml).
        time.sleep(5)
        lines = self.gateway_metric("gateway_worker_spec_decode_acceptance_ratio")
        rec["gateway_metric"] = lines
        log("gateway /metrics: " + " | ".join(lines))

    # ------------------------------------------------------------------ 4. LoRA

    def lora(self) -> None:
        self.wait_make_lora()
        rec: dict[str, Any] = {"path": self.lora_path, "cycles": []}
        self.results["lora"] = rec
        client = self.client()

        def greedy(model: str) -> str:
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": LORA_PROMPT}],
                max_tokens=40,
                temperature=0,
            )
            return r.choices[0].message.content or ""

        rec["base_output"] = greedy("smol")
        log(f"base smol: {rec['base_output']!r}")
        for cycle in range(2):
            c: dict[str, Any] = {}
            rec["cycles"].append(c)
            t0 = time.perf_counter()
            status, headers, body = self.http(
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": "lora1", "lora_path": self.lora_path, "base_model": "smol"},
                admin=True,
                timeout=120,
            )
            c["load"] = {
                "status": status,
                "seconds": round(time.perf_counter() - t0, 4),
                "server_timing": headers.get("server-timing") or headers.get("Server-Timing"),
                "body": body.decode(errors="replace")[:300],
            }
            log(
                f"load #{cycle + 1}: {status} in {c['load']['seconds']:.3f} s "
                f"({c['load']['server_timing']}): {c['load']['body']}"
            )
            if status != 200:
                raise RuntimeError(f"load answered {status}: {body[:300]!r}")
            listing = client.models.list()
            entry = next((m for m in listing.data if m.id == "lora1"), None)
            c["listed"] = entry.model_dump() if entry is not None else None
            log(f"/v1/models lora1: {c['listed']}")
            if cycle == 0:
                c["adapters_loaded_metric"] = self.gateway_metric("gateway_adapters_loaded")
                out = greedy("lora1")
                rec["lora_output"] = out
                rec["differs_from_base"] = out != rec["base_output"]
                log(f"lora1: {out!r} (differs from base: {rec['differs_from_base']})")
                # Streamed through the adapter too.
                s = client.chat.completions.create(
                    model="lora1",
                    messages=[{"role": "user", "content": LORA_PROMPT}],
                    max_tokens=40,
                    temperature=0,
                    stream=True,
                )
                rec["lora_stream_output"] = "".join(
                    ch.choices[0].delta.content or "" for ch in s if ch.choices
                )
                rec["base_after_load"] = greedy("smol")
                log(f"base smol with lora1 loaded: {rec['base_after_load']!r}")
            t0 = time.perf_counter()
            status, _, body = self.http(
                "POST", "/v1/unload_lora_adapter", {"lora_name": "lora1"}, admin=True, timeout=120
            )
            c["unload"] = {
                "status": status,
                "seconds": round(time.perf_counter() - t0, 4),
                "body": body.decode(errors="replace")[:300],
            }
            log(f"unload #{cycle + 1}: {status} in {c['unload']['seconds']:.3f} s")
            try:
                greedy("lora1")
                c["after_unload"] = "answered (unexpected)"
            except Exception as exc:
                code = getattr(exc, "status_code", "?")
                c["after_unload"] = f"{type(exc).__name__}: status {code}"
            c["listed_after_unload"] = any(m.id == "lora1" for m in client.models.list().data)
            log(f"after unload: {c['after_unload']}; listed: {c['listed_after_unload']}")
        # A path outside the roots never reaches a worker.
        status, _, body = self.http(
            "POST", "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/etc"}, admin=True
        )
        rec["outside_root"] = {"status": status, "body": body.decode(errors="replace")[:300]}

    # ------------------------------------------------------------------ LMDeploy shapes

    def lmdeploy_direct(self) -> None:
        """The same requests to the LMDeploy worker directly and through the gateway: the
        text must match (the gateway changes no sampling), the shapes are cleaned."""
        model = self.models[0]
        url = self.worker_url(model)
        if url is None:
            raise RuntimeError(f"no worker URL for {model}")
        rec: dict[str, Any] = {"worker": url}
        self.results["lmdeploy_direct"] = rec
        msgs = [{"role": "user", "content": QUESTION}]
        for label, extra in (("greedy", {"temperature": 0}), ("lmdeploy_defaults", {})):
            body = {"model": model, "messages": msgs, "max_tokens": 48, **extra}
            for where, base in (("direct", url), ("gateway", self.base)):
                if where == "gateway" and not extra:
                    # The gateway would apply request_defaults (temperature 0): skip.
                    continue
                status, _, raw = self.http(
                    "POST", "/v1/chat/completions", body, base=base, timeout=60
                )
                doc = json.loads(raw)
                msg = (doc.get("choices") or [{}])[0].get("message", {})
                rec[f"{label}_{where}"] = {
                    "status": status,
                    "text": msg.get("content"),
                    "keys": sorted(doc),
                    "message_keys": sorted(msg),
                }
                log(
                    f"lmdeploy {label} {where}: {status} {msg.get('content')!r} "
                    f"keys={sorted(doc)} message_keys={sorted(msg)}"
                )
        # The first raw SSE lines of a stream, direct and through the gateway.
        body = {"model": model, "messages": msgs, "max_tokens": 8, "temperature": 0, "stream": True}
        for where, base in (("direct", url), ("gateway", self.base)):
            req = urllib.request.Request(
                base + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                lines = [ln for ln in r.read().decode().splitlines() if ln.strip()]
            rec[f"stream_{where}"] = lines[:4]
            log(f"lmdeploy stream {where}: {lines[:3]}")

    # ------------------------------------------------------------------ 5. bench

    def bench(self) -> None:
        direct = self.worker_url("smol")
        if direct is None:
            raise RuntimeError("no worker URL for smol")
        a = self.args
        plan = [
            (int(c), int(n), int(r))
            for c, n, r in (item.split(":") for item in a.bench_plan.split(","))
        ]
        runs: list[dict[str, Any]] = []
        worker_pid = self._worker_pid(direct)
        self.results["bench"] = {
            "direct_url": direct,
            "gateway_url": self.base,
            "runs": runs,
            "max_tokens": a.bench_max_tokens,
        }
        raw = self.work / "bench"
        raw.mkdir(exist_ok=True)
        took: dict[int, float] = {}
        for conc, n, rounds in plan:
            for rnd in range(rounds):
                for target, url in (("direct", direct), ("gateway", self.base)):
                    est = took.get(conc, 0.0) * 1.3 + 5
                    if self.left() - 50 < est:
                        log(
                            f"bench: skipping {target} c={conc} round {rnd + 1} "
                            f"({self.left():.0f} s left, needs ~{est:.0f} s)"
                        )
                        runs.append(
                            {
                                "target": target,
                                "concurrency": conc,
                                "round": rnd + 1,
                                "skipped": "deadline",
                            }
                        )
                        continue
                    path = raw / f"{target}-c{conc}-r{rnd + 1}.json"
                    cmd = [
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
                        "--num-requests",
                        str(n),
                        "--max-tokens",
                        str(a.bench_max_tokens),
                        "--ignore-eos",
                        "--prompt-tokens",
                        "32",
                        "--warmup",
                        str(min(conc, 8) if conc > 1 else 2),
                        "--seed",
                        str(rnd),
                        "--no-progress",
                        "--json",
                        str(path),
                        "--label",
                        f"{target}-c{conc}-r{rnd + 1}",
                    ]
                    t0 = time.time()
                    cpu0 = (
                        _cpu_s(self.gw.pid if self.gw else None),
                        _cpu_s(worker_pid),
                        _children_cpu_s(),
                    )
                    with CpuSampler([self.gw.pid if self.gw else None, worker_pid]) as smp:
                        p = subprocess.run(
                            cmd,
                            cwd=ROOT,
                            capture_output=True,
                            text=True,
                            env=self.env(),
                            timeout=max(10.0, self.left() - 45),
                        )
                    dt = time.time() - t0
                    cpu1 = (
                        _cpu_s(self.gw.pid if self.gw else None),
                        _cpu_s(worker_pid),
                        _children_cpu_s(),
                    )
                    took[conc] = max(took.get(conc, 0.0), dt)
                    rec: dict[str, Any] = {
                        "target": target,
                        "concurrency": conc,
                        "round": rnd + 1,
                        "rc": p.returncode,
                        "wall_s": round(dt, 1),
                        "cmd": " ".join(cmd[1:]),
                        # CPU seconds over the whole run (incl. warmup):
                        # the gateway process, the vLLM API server
                        # process (not its engine core), the load generator.
                        "cpu_s": {
                            k: round(b - a_, 2)
                            for k, a_, b in zip(
                                ("gateway", "vllm_api_server", "loadgen"), cpu0, cpu1, strict=True
                            )
                        },
                        # Highest CPU use over any 2 s window (1.0 = one
                        # core): [gateway, vLLM API server].
                        "cpu_peak_2s": smp.peaks(),
                    }
                    if p.returncode != 0 or not path.exists():
                        rec["error"] = (p.stderr or p.stdout)[-1500:]
                        log(f"bench {target} c={conc}: rc {p.returncode}: {rec['error'][-300:]}")
                    if path.exists():
                        doc = json.loads(path.read_text())
                        rec["summary"] = doc["runs"][0]["summary"]
                        s = rec["summary"]
                        log(
                            f"bench {target:7s} c={conc:<3d} r{rnd + 1}: "
                            f"{s['completed']}/{s['requests']} ok, "
                            f"{s['output_throughput']:.0f} tok/s, "
                            f"TTFT p50 {s['ttft_ms']['p50']:.2f} ms, "
                            f"ITL p50 {s['itl_ms']['p50']:.2f} ms, "
                            f"e2e p50 {s['e2el_ms']['p50']:.1f} ms ({dt:.0f} s); "
                            f"CPU s {rec['cpu_s']}"
                        )
                    runs.append(rec)
        self.results["bench"]["table"] = bench_table(runs)
        for row in self.results["bench"]["table"]:
            log(
                f"bench c={row['concurrency']}: throughput ratio gateway/direct "
                f"{row['throughput_ratio']}, TTFT p50 added {row['ttft_p50_added_ms']} ms, "
                f"ITL p50 added {row['itl_p50_added_ms']} ms"
            )

    # ------------------------------------------------------------------ output

    def collect(self) -> None:
        with contextlib.suppress(Exception):
            self.results["nvidia_smi_end"] = subprocess.run(
                ["nvidia-smi"], capture_output=True, text=True, timeout=20
            ).stdout
        if self.gw_log_path.exists():
            shutil.copy(self.gw_log_path, self.out / "gateway.log")
        parts = []
        for p in sorted(self.cache.glob("logs/**/*.log")):
            lines = p.read_text(errors="replace").splitlines()
            keep = (
                lines
                if len(lines) <= 700
                else ([*lines[:150], f"... ({len(lines) - 650} lines left out) ...", *lines[-500:]])
            )
            parts.append(
                f"##### {p.relative_to(self.cache)} ({len(lines)} lines)\n" + "\n".join(keep)
            )
        ml = self.work / "make_lora.log"
        if ml.exists():
            parts.append("##### make_lora.log\n" + ml.read_text(errors="replace")[-4000:])
        (self.out / "workers.log").write_text("\n\n".join(parts) + "\n")
        bench = self.results.get("bench")
        if bench:
            (self.out / "bench.json").write_text(json.dumps(bench, indent=2))
            raw = self.work / "bench"
            if raw.exists():
                with tarfile.open(self.out / "bench_raw.tar.gz", "w:gz") as tar:
                    tar.add(raw, arcname="bench")
        self.results["finished_in_s"] = round(time.time() - T_START, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def run(self) -> int:
        cfg = self.step("prepare config", self.prepare)
        if cfg is None:
            self.collect()
            return 1
        self.step("gateway check", self.check, cfg)
        if not self.args.lmdeploy:
            self.step("make_lora (start)", self.start_make_lora)
        try:
            self.step("start gateway", self.start_gateway, cfg)
            if not self.results["steps"]["start gateway"]["ok"]:
                return 1
            with contextlib.suppress(Exception):
                self.results["nvidia_smi_ready"] = subprocess.run(
                    ["nvidia-smi"], capture_output=True, text=True, timeout=20
                ).stdout
            self.step("health", self.health)
            self.step("chat", self.chat_all)
            if self.args.lmdeploy:
                self.step("lmdeploy direct", self.lmdeploy_direct)
            else:
                self.step("ngram", self.ngram)
                self.step("lora", self.lora)
                if not self.args.no_bench:
                    self.step("bench", self.bench)
            self.step(
                "gateway metrics",
                lambda: self.results.__setitem__(
                    "gateway_metrics",
                    [
                        line
                        for line in self.http("GET", "/metrics")[2].decode().splitlines()
                        if line.startswith("gateway_")
                        and not line.startswith("gateway_request_duration")
                    ],
                ),
            )
            return 0
        finally:
            self.step("stop", self.stop_gateway)
            if self.lora_proc is not None and self.lora_proc.poll() is None:
                self.lora_proc.kill()
            self.collect()
            summary(self.results)


class CpuSampler:
    """Samples the CPU time of a few processes every 0.25 s in a thread; `peaks()` is each
    one's highest use over a 2 s window (in cores)."""

    def __init__(self, pids: list[int | None]) -> None:
        import threading

        self.pids = pids
        self.samples: list[tuple[float, list[float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), [_cpu_s(p) for p in self.pids]))
            self._stop.wait(0.25)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def peaks(self) -> list[float]:
        out = []
        for k in range(len(self.pids)):
            best = 0.0
            j = 0
            for i in range(len(self.samples)):
                while self.samples[i][0] - self.samples[j][0] > 2.0:
                    j += 1
                dt = self.samples[i][0] - self.samples[j][0]
                if dt >= 1.5:
                    best = max(best, (self.samples[i][1][k] - self.samples[j][1][k]) / dt)
            out.append(round(best, 3))
        return out


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: means over rounds of direct and gateway, ratios and differences."""
    rows = []
    for conc in sorted({r["concurrency"] for r in runs}, reverse=True):

        def pick(target: str, c: int = conc) -> list[dict[str, Any]]:
            return [
                r["summary"]
                for r in runs
                if r["concurrency"] == c
                and r["target"] == target
                and "summary" in r
                and r["summary"]["completed"]
            ]

        d, g = pick("direct"), pick("gateway")
        if not d or not g:
            continue

        def mean(xs: list[dict[str, Any]], f: Any) -> float:
            return float(sum(f(x) for x in xs)) / len(xs)

        row: dict[str, Any] = {
            "concurrency": conc,
            "rounds_direct": len(d),
            "rounds_gateway": len(g),
        }
        for key, f in (
            ("output_tok_s", lambda s: s["output_throughput"]),
            ("req_s", lambda s: s["request_throughput"]),
            ("ttft_p50_ms", lambda s: s["ttft_ms"]["p50"]),
            ("ttft_p99_ms", lambda s: s["ttft_ms"]["p99"]),
            ("itl_p50_ms", lambda s: s["itl_ms"]["p50"]),
            ("itl_p99_ms", lambda s: s["itl_ms"]["p99"]),
            ("tpot_p50_ms", lambda s: s["tpot_ms"]["p50"]),
            ("e2el_p50_ms", lambda s: s["e2el_ms"]["p50"]),
            ("failed", lambda s: s["failed"]),
        ):
            row[f"direct_{key}"] = round(mean(d, f), 3)
            row[f"gateway_{key}"] = round(mean(g, f), 3)
        # Per-round ratios (round i's gateway run against round i's direct run).
        pairs: dict[int, dict[str, Any]] = {}
        for r in runs:
            if r["concurrency"] == conc and "summary" in r:
                pairs.setdefault(r["round"], {})[r["target"]] = r
        row["round_ratios"] = [
            round(
                p["gateway"]["summary"]["output_throughput"]
                / p["direct"]["summary"]["output_throughput"],
                4,
            )
            for _, p in sorted(pairs.items())
            if "gateway" in p and "direct" in p
        ]
        cpu = [
            r
            for r in runs
            if r["concurrency"] == conc
            and r["target"] == "gateway"
            and "cpu_s" in r
            and "summary" in r
        ]
        if cpu:
            row["gateway_cpu_util"] = round(
                mean(cpu, lambda r: r["cpu_s"]["gateway"] / r["wall_s"]), 3
            )
            row["gateway_cpu_ms_per_request"] = round(
                mean(cpu, lambda r: 1000 * r["cpu_s"]["gateway"] / r["summary"]["requests"]), 3
            )
        row["throughput_ratio"] = round(row["gateway_output_tok_s"] / row["direct_output_tok_s"], 4)
        row["ttft_p50_added_ms"] = round(row["gateway_ttft_p50_ms"] - row["direct_ttft_p50_ms"], 3)
        row["ttft_p99_added_ms"] = round(row["gateway_ttft_p99_ms"] - row["direct_ttft_p99_ms"], 3)
        row["itl_p50_added_ms"] = round(row["gateway_itl_p50_ms"] - row["direct_itl_p50_ms"], 3)
        row["e2el_p50_added_ms"] = round(row["gateway_e2el_p50_ms"] - row["direct_e2el_p50_ms"], 3)
        rows.append(row)
    return rows


def summary(r: dict[str, Any]) -> None:
    print("\n================ SUMMARY ================", flush=True)
    st = r.get("start", {})
    print(
        f"start: launch→ready {st.get('launch_to_ready_s')} s, per model "
        f"{st.get('model_ready_s')}, first token {st.get('first_token_after_launch_s')} s "
        f"after launch; attempts {len(st.get('attempts', []))}"
    )
    for model, c in r.get("chat", {}).items():
        print(
            f"chat {model}: stream {c.get('stream', {}).get('text', c.get('stream_error'))!r}"
            f" | whole {c.get('whole', {}).get('text', c.get('whole_error'))!r}"
        )
    ng = r.get("ngram")
    if ng:
        print(
            f"ngram: accepted {ng.get('accepted_tokens')} / draft {ng.get('draft_tokens')} "
            f"= {ng.get('acceptance_ratio')}; gateway: {ng.get('gateway_metric')}"
        )
    lo = r.get("lora")
    if lo:
        print(
            f"lora: base {lo.get('base_output')!r} | adapter {lo.get('lora_output')!r} | "
            f"differs {lo.get('differs_from_base')}"
        )
        for i, c in enumerate(lo.get("cycles", [])):
            print(
                f"  cycle {i + 1}: load {c.get('load', {}).get('seconds')} s, unload "
                f"{c.get('unload', {}).get('seconds')} s, parent "
                f"{(c.get('listed') or {}).get('parent')}, after unload {c.get('after_unload')}"
            )
    for row in (r.get("bench") or {}).get("table", []):
        print(
            f"bench c={row['concurrency']}: direct {row['direct_output_tok_s']:.0f} tok/s, "
            f"gateway {row['gateway_output_tok_s']:.0f} tok/s, ratio {row['throughput_ratio']}; "
            f"TTFT p50 {row['direct_ttft_p50_ms']:.2f} → {row['gateway_ttft_p50_ms']:.2f} ms "
            f"(+{row['ttft_p50_added_ms']})"
        )
    for e in r.get("errors", []):
        print(f"ERROR in {e['step']}: {e['error'][:300]}")
    print(f"finished in {r.get('finished_in_s')} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "deploy" / "gpu" / "models.yaml"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-proof-out"))
    ap.add_argument("--work", help="scratch directory (default: a new temp dir)")
    ap.add_argument("--deadline", type=float, help="epoch seconds by which to be done")
    ap.add_argument("--budget-s", type=float, default=480.0, help="without --deadline")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ready-timeout-s", type=float, default=330.0)
    ap.add_argument("--dry-run", action="store_true", help="simulator instead of vLLM")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument(
        "--lmdeploy",
        action="store_true",
        help="the optional LMDeploy part: chat through engine lmdeploy only",
    )
    ap.add_argument(
        "--bench-plan",
        default="64:500:2,1:50:2",
        help="CONCURRENCY:REQUESTS:ROUNDS,... (each round: direct, then gateway)",
    )
    ap.add_argument("--bench-max-tokens", type=int, default=128)
    args = ap.parse_args()
    return Proof(args).run()


if __name__ == "__main__":
    sys.exit(main())
