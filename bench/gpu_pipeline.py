"""The issue-13 proof on one H200 (docs/gpu.md, "The pipeline on the H200"): quantize
SmolLM2-135M-Instruct to AWQ, GPTQ (W4A16) and FP8 (static) with `gateway quantize`
(llm-compressor), serve each with vLLM through the gateway in launch mode, draft-model
speculation with a layer-truncated SmolLM2 as the draft, AWQ on LMDeploy's PyTorch engine,
the eval table (base vs each checkpoint) with `gateway eval`, latency and tok/s per format
with `gateway bench`, and the evidence for LMDeploy's greedy answer.

Run on the GPU machine after ../shared/gpu/device-setup.sh (which makes /root/smol) with
llm-compressor's wheels installed in /root/q and LMDeploy's add-on in /root/lmd:

    PYTHONPATH=<this tree> python3 <this tree>/bench/gpu_pipeline.py --out $OUT --deadline T

Steps (each recorded in results.json; a failing step is recorded and the next one runs):
1. In parallel: the `gateway quantize` runs (awq, gptq, fp8), the draft model (the first
   DRAFT_LAYERS decoder layers of /root/smol), and a transformers reference of the greedy
   answer in bf16 / fp16 / fp32 on the GPU. Then `gateway awq-export` rewrites the awq
   checkpoint (compressed-tensors) in AutoAWQ format for LMDeploy's PyTorch engine, which
   cannot load compressed-tensors for a Llama model (docs/gpu.md).
2. One `gateway serve` per model (each its own models.yaml and port, so one model failing
   to start cannot take the others down), all started at once; then one more gateway in
   attach mode in front of every ready worker, for the side-by-side eval.
3. A chat on every model, `gateway eval` over all of them, the draft model's acceptance
   from the worker's metrics, `gateway bench` per model, the LMDeploy greedy evidence.
Everything started is stopped at the end. `--dry-run` swaps every engine for the
simulator and the quantize and export runs for empty checkpoint directories (no GPU).

`--only PART,...` runs a subset (default: all of PARTS); only the checkpoints and models
the chosen parts need are made and started. E.g. `--only awq-lmdeploy,c1-latency`:
quantize awq, gptq, fp8 → export awq to AutoAWQ → serve it on LMDeploy's PyTorch engine
and the three formats plus bf16 on vLLM → a chat on each → `gateway bench` at
concurrency 1 per vLLM format.

This is a measurement script, not library code: it is long because it is one sequence.

Why one file of this size: it is copied to the GPU machine and run there as one script;
every step is a function, in the order it runs.
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
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

TREE = Path(__file__).resolve().parent.parent
SMOL = "/root/smol"
CK = Path("/root/ck")
DRAFT_LAYERS = 8
QUANT = {  # name → gateway quantize arguments
    "awq": ["--method", "awq"],
    "gptq": ["--method", "gptq"],
    "fp8": ["--method", "fp8"],
}
AUTOAWQ = "awq-autoawq"  # `gateway awq-export` of CK/awq
VLLM_FORMATS = ("smol", "smol-awq", "smol-gptq", "smol-fp8")
# --only parts → the models each one serves (models.yaml names in `Run.entries`).
PARTS: dict[str, tuple[str, ...]] = {
    "vllm-formats": VLLM_FORMATS,  # chat on each
    "awq-lmdeploy": ("lmd-awq",),  # quantize awq → export → LMDeploy PyTorch → chat
    "draft": ("smol-draft",),  # draft-model speculation and its acceptance
    "greedy": ("smol", "lmd-bf16", "lmd-fp16"),  # LMDeploy's greedy answer evidence
    "eval": (),  # `gateway eval` over every model started
    "bench": (),  # `gateway bench` c=16 and c=1 over every model started
    "c1-latency": VLLM_FORMATS,  # `gateway bench` c=1 per vLLM format
}
# Checkpoints (CK/<name>) each model needs.
NEEDS: dict[str, tuple[str, ...]] = {
    "smol-awq": ("awq",),
    "smol-gptq": ("gptq",),
    "smol-fp8": ("fp8",),
    "smol-draft": ("draft",),
    "lmd-awq": ("awq", AUTOAWQ),
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ADMIN_KEY = "gpu-pipeline-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


DRAFT_CODE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
m.model.layers = m.model.layers[:n]
m.config.num_hidden_layers = n
if getattr(m.config, "layer_types", None):
    m.config.layer_types = m.config.layer_types[:n]
m.save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
print("draft", n, "layers ->", out)
"""

HF_REF_CODE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(src)
msgs = [{"role": "user", "content": "What is the capital of France?"}]
enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                              return_dict=True)
ids = enc["input_ids"]
res = {"prompt": tok.decode(ids[0]), "prompt_tokens": int(ids.shape[1])}
for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
    m = AutoModelForCausalLM.from_pretrained(src, dtype=dt).cuda().eval()
    with torch.no_grad():
        g = m.generate(ids.cuda(), max_new_tokens=24, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    new = g.sequences[0, ids.shape[1]:]
    top = []
    for s in g.scores[:3]:
        lp = torch.log_softmax(s[0].float(), -1)
        v, i = lp.topk(5)
        top.append([[tok.decode([int(t)]), round(float(x), 4)] for x, t in zip(v, i)])
    res[name] = {"text": tok.decode(new, skip_special_tokens=True), "top5_first3": top}
json.dump(res, open(out, "w"), indent=2)
print(json.dumps({k: v["text"] if isinstance(v, dict) else v for k, v in res.items()}))
"""


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.R: dict[str, Any] = {"steps": {}, "errors": []}
        self.gateways: dict[str, dict[str, Any]] = {}  # name → {proc, port, log, ...}
        self.front: subprocess.Popen[bytes] | None = None
        self.parts = set(args.only.split(",")) if args.only else set(PARTS)
        self.models = {m for p in self.parts for m in PARTS[p]}
        if args.no_lmdeploy:
            self.models = {m for m in self.models if not m.startswith("lmd")}
        self.ckpts = {c for m in self.models for c in NEEDS.get(m, ())}
        self.env = {
            **os.environ,
            "PYTHONPATH": str(TREE),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_USE_FLASHINFER_SAMPLER": "0",
            "GATEWAY_CACHE_DIR": str(self.work / "gw-cache"),
            # /health lists worker URLs only to the admin key (gateway/api/ops.py).
            "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        }

    def left(self) -> float:
        return self.args.deadline - time.time()

    def step(self, name: str, fn: Any, *a: Any) -> Any:
        t0 = time.time()
        log(f"== {name}")
        try:
            val = fn(*a)
            self.R["steps"][name] = {"ok": True, "s": round(time.time() - t0, 1)}
            return val
        except Exception as e:  # recorded; the next step runs
            msg = f"{type(e).__name__}: {e}"
            self.R["steps"][name] = {"ok": False, "s": round(time.time() - t0, 1), "error": msg}
            self.R["errors"].append({"step": name, "error": msg[-2000:]})
            log(f"!! {name}: {msg[-600:]}")
            return None
        finally:
            self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.R, indent=2, default=str))

    # ------------------------------------------------------------------ 1. checkpoints

    def make_checkpoints(self) -> None:
        CK.mkdir(parents=True, exist_ok=True)
        qenv = {**self.env, "PYTHONPATH": f"/root/q:{TREE}"}
        procs: dict[str, tuple[subprocess.Popen[bytes], Any, float]] = {}

        def start(name: str, argv: list[str], env: dict[str, str]) -> None:
            f = (self.work / f"{name}.log").open("wb")
            procs[name] = (
                subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=TREE),
                f,
                time.time(),
            )

        quant = [n for n in QUANT if n in self.ckpts]
        if self.args.dry_run:
            for name in quant:
                d = CK / name
                d.mkdir(parents=True, exist_ok=True)
                (d / "config.json").write_text("{}")
            if "draft" in self.ckpts:
                (CK / "draft").mkdir(exist_ok=True)
        else:
            for name in quant:
                argv = [sys.executable, "-m", "gateway", "quantize", SMOL, *QUANT[name]]
                start(f"quantize-{name}", [*argv, "--out", str(CK / name), "--force"], qenv)
            if "draft" in self.ckpts:
                draft = [sys.executable, "-c", DRAFT_CODE, SMOL, str(CK / "draft")]
                start("draft", [*draft, str(DRAFT_LAYERS)], self.env)
            if "greedy" in self.parts:
                ref = [sys.executable, "-c", HF_REF_CODE, SMOL, str(self.out / "hf_ref.json")]
                start("hf-ref", ref, self.env)
        limit = time.time() + min(self.args.quantize_timeout_s, self.left() - 200)
        rec: dict[str, Any] = {}
        for name, (p, f, t0) in procs.items():
            try:
                p.wait(timeout=max(1.0, limit - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            f.close()
            tail = (self.work / f"{name}.log").read_text(errors="replace").splitlines()
            rec[name] = {"rc": p.returncode, "s": round(time.time() - t0, 1), "tail": tail[-12:]}
            qj = CK / name.removeprefix("quantize-") / "quantize.json"
            if name.startswith("quantize-") and qj.exists():
                rec[name]["record"] = json.loads(qj.read_text())
                cfg = json.loads((qj.parent / "config.json").read_text()).get("quantization_config")
                rec[name]["quantization_config"] = cfg
                rec[name]["bytes"] = sum(x.stat().st_size for x in qj.parent.glob("*.safetensors"))
            log(f"{name}: rc {p.returncode} in {rec[name]['s']} s: {tail[-1:] if tail else ''}")
        rec["bf16_bytes"] = (
            sum(x.stat().st_size for x in Path(SMOL).glob("*.safetensors"))
            if Path(SMOL).exists()
            else None
        )
        self.R["checkpoints"] = rec

    def export_autoawq(self) -> None:
        """`gateway awq-export CK/awq --out CK/awq-autoawq`: the same AWQ integers in the
        AutoAWQ GEMM format, for LMDeploy's PyTorch engine (torch + safetensors only)."""
        if AUTOAWQ not in self.ckpts:
            return
        dst = CK / AUTOAWQ
        if self.args.dry_run:
            dst.mkdir(parents=True, exist_ok=True)
            (dst / "config.json").write_text("{}")
            self.R["autoawq"] = {"dry_run": True}
            return
        argv = [sys.executable, "-m", "gateway", "awq-export", str(CK / "awq")]
        argv += ["--out", str(dst), "--force"]
        t0 = time.time()
        p = subprocess.run(argv, cwd=TREE, env=self.env, capture_output=True, text=True,
                           timeout=max(30, min(300, self.left() - 200)))  # fmt: skip
        rec: dict[str, Any] = {
            "cmd": " ".join(argv[2:]),
            "rc": p.returncode,
            "s": round(time.time() - t0, 1),
            "tail": (p.stdout + p.stderr).splitlines()[-8:],
        }
        if (dst / "awq_export.json").exists():
            rec["record"] = json.loads((dst / "awq_export.json").read_text())
            rec["bytes"] = sum(x.stat().st_size for x in dst.glob("*.safetensors"))
        self.R["autoawq"] = rec
        log(f"awq-export: rc {p.returncode} in {rec['s']} s: {rec['tail'][-1:]}")
        if p.returncode != 0:
            raise RuntimeError(f"awq-export failed: {rec['tail']}")

    # ------------------------------------------------------------------ 2. gateways

    def entries(self) -> dict[str, dict[str, Any]]:
        vopts = {
            "start_timeout_s": 300,
            "stop_grace_s": 10,
            "health_interval_s": 2,
            "env": {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"},
        }
        if shutil.which("vllm") is None:
            vopts["command"] = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        vargs = {
            "gpu-memory-utilization": 0.08,
            "kv-cache-memory-bytes": 2 << 30,
            "enforce-eager": True,
        }
        lopts = {
            "command": [sys.executable, "-m", "lmdeploy"],
            "cache_max_entry_count": 0.05,
            "start_timeout_s": 300,
            "stop_grace_s": 10,
            "health_interval_s": 2,
            "env": {"PYTHONPATH": "/root/lmd/site:/root/lmd/dep", "HF_HUB_OFFLINE": "1"},
        }
        base = {
            "max_model_len": 2048,
            "request_defaults": {"temperature": 0},
            # `gateway bench --ignore-eos` sends vLLM's extension; the allowlist refuses
            # fields nobody turned on (gateway/allowlist.py).
            "request_fields": {"allow_extra": ["ignore_eos"]},
        }

        def v(model: str, **kw: Any) -> dict[str, Any]:
            return {
                **base,
                "engine": "vllm",
                "model": model,
                "options": dict(vopts),
                "engine_args": dict(vargs),
                **kw,
            }

        def lm(model: str, **kw: Any) -> dict[str, Any]:
            return {**base, "engine": "lmdeploy", "model": model, "options": dict(lopts), **kw}

        largs = {"logprobs-mode": "raw_logprobs"}  # LMDeploy answers logprobs only with it
        pt = {**lopts, "backend": "pytorch"}
        e = {
            "smol": v(SMOL),
            "smol-awq": v(str(CK / "awq"), quantization="awq"),
            "smol-gptq": v(str(CK / "gptq"), quantization="gptq"),
            "smol-fp8": v(str(CK / "fp8"), quantization="fp8"),
            "smol-draft": v(
                SMOL,
                speculative={
                    "method": "draft",
                    "model": str(CK / "draft"),
                    "num_speculative_tokens": 4,
                },
            ),
        }
        # The AutoAWQ export is group 64 (SmolLM2's width 576): TurboMind takes 128 only,
        # so the backend is named; the image has no TurboMind anyway.
        e["lmd-awq"] = lm(str(CK / AUTOAWQ), quantization="awq", options=pt, engine_args=largs)
        e["lmd-bf16"] = lm(SMOL, options=pt, engine_args=largs)
        e["lmd-fp16"] = lm(SMOL, dtype="float16", options=pt, engine_args=largs)
        e = {name: entry for name, entry in e.items() if name in self.models}
        if self.args.dry_run:
            for m in e.values():
                m.update(engine="sim", options={"ttft_ms": 20, "itl_ms": 3})
                for k in ("model", "engine_args", "quantization", "speculative", "dtype"):
                    m.pop(k, None)
        return e

    def start_gateways(self) -> None:
        entries = self.entries()
        self.R["models_yaml"] = entries
        port = 8100
        for name, entry in entries.items():
            need = entry.get("model")
            if need and need.startswith(str(CK)) and not (Path(need) / "config.json").exists():
                log(f"{name}: no checkpoint, not started")
                self.R.setdefault("skipped", []).append(name)
                continue
            spec = entry.get("speculative") or {}
            if spec.get("model") and not (Path(spec["model"]) / "config.json").exists():
                self.R.setdefault("skipped", []).append(name)
                continue
            cfg = self.work / f"models-{name}.yaml"
            cfg.write_text(yaml.safe_dump({"models": [{"name": name, **entry}]}, sort_keys=False))
            port += 1
            chk = subprocess.run(
                [sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
                cwd=TREE,
                env=self.env,
                capture_output=True,
                text=True,
            )
            self.R.setdefault("check", {})[name] = (chk.stdout + chk.stderr).strip()
            f = (self.work / f"gw-{name}.log").open("wb")
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(cfg),
                    "--port",
                    str(port),
                ],
                env=self.env,
                cwd=TREE,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.gateways[name] = {
                "proc": p,
                "port": port,
                "url": f"http://127.0.0.1:{port}",
                "t0": time.time(),
            }
        limit = time.time() + min(self.args.ready_timeout_s, self.left() - 150)
        pending = set(self.gateways)
        while pending and time.time() < limit:
            for name in sorted(pending):
                g = self.gateways[name]
                if g["proc"].poll() is not None:
                    g["failed"] = f"gateway exited rc {g['proc'].returncode}"
                    pending.discard(name)
                    log(f"{name}: FAILED to start ({g['failed']})")
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(g["url"] + "/health", timeout=2, headers=ADMIN)
                    if r.status_code == 200:
                        g["ready_s"] = round(time.time() - g["t0"], 1)
                        g["health"] = r.json()
                        ws = g["health"].get("models", {}).get(name, {}).get("workers", {})
                        listed = ws.get("list", []) if isinstance(ws, dict) else ws
                        g["worker"] = listed[0].get("url") if listed else None
                        pending.discard(name)
                        log(f"{name}: ready in {g['ready_s']} s, worker {g['worker']}")
            time.sleep(1)
        for name in pending:
            self.gateways[name]["failed"] = "not ready in time"
        self.R["gateways"] = {
            n: {k: v for k, v in g.items() if k not in ("proc",)} for n, g in self.gateways.items()
        }

    def ready(self) -> list[str]:
        return [n for n, g in self.gateways.items() if "ready_s" in g]

    def start_front(self) -> None:
        models = []
        for name in self.ready():
            g = self.gateways[name]
            eng = "lmdeploy" if name.startswith("lmd") else "vllm"
            if self.args.dry_run:
                eng = "vllm"  # the simulator speaks vLLM's API
            m: dict[str, Any] = {
                "name": name,
                "engine": eng,
                "endpoints": [g["worker"]],
                "max_model_len": 2048,
                "request_defaults": {"temperature": 0},
            }
            if eng == "lmdeploy":
                m["options"] = {"backend": "pytorch"}
            models.append(m)
        cfg = self.work / "models-front.yaml"
        cfg.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
        f = (self.work / "gw-front.log").open("wb")
        self.front = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", "9000"],
            cwd=TREE,
            env=self.env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for _ in range(60):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get("http://127.0.0.1:9000/health", timeout=2).status_code == 200:
                    log("front gateway ready")
                    return
            if self.front.poll() is not None:
                break
            time.sleep(1)
        raise RuntimeError("front gateway did not start; see gw-front.log")

    # ------------------------------------------------------------------ 3. use them

    def chat_all(self) -> None:
        out: dict[str, Any] = {}
        self.R["chat"] = out
        for name in self.ready():
            url = self.gateways[name]["url"]
            body = {"model": name, "messages": QUESTION, "max_tokens": 32, "temperature": 0}
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            rec: dict[str, Any] = {"status": r.status_code, "s": round(time.perf_counter() - t0, 3)}
            if r.status_code == 200:
                rec["text"] = r.json()["choices"][0]["message"]["content"]
            else:
                rec["error"] = r.text[:400]
            t0 = time.perf_counter()
            first = None
            parts = []
            with httpx.stream(
                "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
            ) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        d = json.loads(line[6:])
                        for c in d.get("choices") or []:
                            piece = (c.get("delta") or {}).get("content")
                            if piece:
                                first = first or time.perf_counter() - t0
                                parts.append(piece)
            rec["stream_text"] = "".join(parts)
            rec["stream_ttft_s"] = round(first, 3) if first else None
            out[name] = rec
            log(
                f"chat {name}: {rec.get('text', rec.get('error'))!r} | "
                f"stream {rec['stream_text']!r}"
            )

    def evaluate(self) -> None:
        models = ",".join(self.ready())
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "eval",
            "--base-url",
            "http://127.0.0.1:9000",
            "--model",
            models,
            "--concurrency",
            "8",
            "--json",
            str(self.out / "eval.json"),
        ]
        p = subprocess.run(
            argv,
            cwd=TREE,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=max(30, self.left() - 120),
        )
        self.R["eval"] = {
            "cmd": " ".join(argv[1:]),
            "rc": p.returncode,
            "table": p.stdout,
            "stderr_tail": p.stderr[-1500:],
        }
        log(f"eval rc {p.returncode}\n{p.stdout}")

    def metrics(self, url: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:spec_decode") and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                name = k.split("{")[0]
                out[name] = out.get(name, 0.0) + float(v)
        return out

    def draft_acceptance(self) -> None:
        g = self.gateways.get("smol-draft", {})
        if "ready_s" not in g:
            raise RuntimeError("smol-draft is not serving")
        before = self.metrics(g["worker"])
        prompts = [
            "What is the capital of France?",
            "Repeat exactly: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
            "Write one sentence about the sea.",
            "Explain in two sentences what a computer is.",
            "Count from 1 to 20, separated by commas.",
            "Give three tips for staying healthy.",
        ]
        t0 = time.perf_counter()
        toks = 0
        for p in prompts:
            r = httpx.post(
                g["url"] + "/v1/chat/completions",
                json={
                    "model": "smol-draft",
                    "messages": [{"role": "user", "content": p}],
                    "max_tokens": 96,
                    "temperature": 0,
                },
                timeout=60,
            )
            toks += r.json()["usage"]["completion_tokens"]
        wall = time.perf_counter() - t0
        after = self.metrics(g["worker"])
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        acc = d.get("vllm:spec_decode_num_accepted_tokens_total", 0)
        draft = d.get("vllm:spec_decode_num_draft_tokens_total", 0)
        drafts = d.get("vllm:spec_decode_num_drafts_total", 0)
        self.R["draft"] = {
            "layers": DRAFT_LAYERS,
            "delta": d,
            "acceptance": round(acc / draft, 4) if draft else None,
            "mean_acceptance_length": round(1 + acc / drafts, 3) if drafts else None,
            "requests": len(prompts),
            "completion_tokens": toks,
            "wall_s": round(wall, 3),
        }
        log(f"draft: {self.R['draft']}")

    def bench(self) -> None:
        out: dict[str, Any] = {}
        self.R["bench"] = out
        plan = [(16, 160, 2), (1, 12, 1)]  # concurrency, requests, warmup
        names = self.ready()
        if "bench" not in self.parts:  # c1-latency alone
            plan = [(1, 12, 1)]
            names = [n for n in names if n in VLLM_FORMATS]
        for conc, n, warm in plan:
            for name in names:
                if self.left() < 90:
                    log("bench: out of time")
                    return
                path = self.work / f"bench-{name}-c{conc}.json"
                argv = [
                    sys.executable,
                    "-m",
                    "gateway",
                    "bench",
                    "--base-url",
                    self.gateways[name]["url"],
                    "--model",
                    name,
                    "--stream",
                    "--concurrency",
                    str(conc),
                    "--num-requests",
                    str(n),
                    "--max-tokens",
                    "128",
                    "--ignore-eos",
                    "--prompt-tokens",
                    "64",
                    "--warmup",
                    str(warm),
                    "--seed",
                    "1",
                    "--no-progress",
                    "--json",
                    str(path),
                    "--label",
                    f"{name}-c{conc}",
                ]
                p = subprocess.run(
                    argv,
                    cwd=TREE,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=max(20, self.left() - 60),
                )
                rec: dict[str, Any] = {"rc": p.returncode, "cmd": " ".join(argv[3:])}
                if path.exists():
                    s = json.loads(path.read_text())["runs"][0]["summary"]
                    rec["summary"] = s
                    log(
                        f"bench {name} c={conc}: {s['completed']}/{s['requests']} ok, "
                        f"{s['output_throughput']:.0f} tok/s, "
                        f"TTFT p50 {s['ttft_ms']['p50']:.1f} ms, "
                        f"ITL p50 {s['itl_ms']['p50']:.2f} ms, e2e p50 {s['e2el_ms']['p50']:.0f} ms"
                    )
                else:
                    rec["error"] = (p.stderr or p.stdout)[-800:]
                    log(f"bench {name} c={conc}: rc {p.returncode} {rec['error'][-300:]}")
                out[f"{name}/c{conc}"] = rec

    def lmdeploy_greedy(self) -> None:
        """The same question to vLLM and LMDeploy workers directly: greedy with top-5
        logprobs, raw completions on the prompt text rendered by transformers, LMDeploy's
        default sampling, and bf16 vs fp16."""
        from transformers import AutoTokenizer

        prompt = AutoTokenizer.from_pretrained(SMOL).apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=False
        )
        out: dict[str, Any] = {"rendered_prompt": prompt}
        self.R["lmdeploy_greedy"] = out
        for name in ("smol", "lmd-bf16", "lmd-fp16", "lmd-awq"):
            g = self.gateways.get(name, {})
            if "ready_s" not in g:
                continue
            w = g["worker"]
            served = name
            rec: dict[str, Any] = {}
            r = httpx.post(
                w + "/v1/chat/completions",
                json={
                    "model": served,
                    "messages": QUESTION,
                    "max_tokens": 24,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": 5,
                },
                timeout=60,
            )
            if r.status_code == 200:
                d = r.json()
                c = d["choices"][0]
                rec["greedy_direct"] = c["message"]["content"]
                rec["prompt_tokens"] = d.get("usage", {}).get("prompt_tokens")
                lp = (c.get("logprobs") or {}).get("content") or []
                rec["top5_first3"] = [
                    [[t["token"], round(t["logprob"], 4)] for t in x.get("top_logprobs", [])]
                    for x in lp[:3]
                ]
            else:
                rec["greedy_error"] = r.text[:300]
            r = httpx.post(
                w + "/v1/completions",
                json={"model": served, "prompt": prompt, "max_tokens": 24, "temperature": 0},
                timeout=60,
            )
            rec["raw_completion"] = (
                r.json()["choices"][0]["text"] if r.status_code == 200 else r.text[:300]
            )
            if name.startswith("lmd"):
                r = httpx.post(
                    w + "/v1/chat/completions",
                    json={"model": served, "messages": QUESTION, "max_tokens": 24},
                    timeout=60,
                )
                rec["default_sampling"] = (
                    r.json()["choices"][0]["message"]["content"]
                    if r.status_code == 200
                    else r.text[:300]
                )
                r = httpx.post(
                    g["url"] + "/v1/chat/completions",
                    json={"model": name, "messages": QUESTION, "max_tokens": 24, "temperature": 0},
                    timeout=60,
                )
                rec["greedy_via_gateway"] = (
                    r.json()["choices"][0]["message"]["content"]
                    if r.status_code == 200
                    else r.text[:300]
                )
            out[name] = rec
            log(f"greedy {name}: {json.dumps(rec)[:700]}")

    # ------------------------------------------------------------------ stop + collect

    def stop(self) -> None:
        procs = [g["proc"] for g in self.gateways.values()] + ([self.front] if self.front else [])
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGINT)
        t0 = time.time()
        for p in procs:
            try:
                p.wait(timeout=max(1.0, 40 - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        self.R["stopped_in_s"] = round(time.time() - t0, 1)

    def collect(self) -> None:
        parts = []
        for p in sorted(self.work.glob("*.log")) + sorted(
            (self.work / "gw-cache").glob("logs/**/*.log")
        ):
            lines = p.read_text(errors="replace").splitlines()
            keep = (
                lines
                if len(lines) <= 260
                else [*lines[:60], f"... ({len(lines) - 260} lines left out) ...", *lines[-200:]]
            )
            parts.append(
                f"##### {p.relative_to(self.work)} ({len(lines)} lines)\n" + "\n".join(keep)
            )
        (self.out / "logs.txt").write_text("\n\n".join(parts) + "\n")
        with contextlib.suppress(Exception):
            self.R["nvidia_smi"] = subprocess.run(
                ["nvidia-smi"], capture_output=True, text=True, timeout=20
            ).stdout
        self.R["finished_in_s"] = round(time.time() - T0, 1)
        self.save()

    def run(self) -> int:
        try:
            self.R["parts"] = sorted(self.parts)
            self.step("checkpoints", self.make_checkpoints)
            self.step("autoawq export", self.export_autoawq)
            self.step("start gateways", self.start_gateways)
            if self.ready():
                self.step("chat", self.chat_all)
                if "eval" in self.parts:
                    self.step("front gateway", self.start_front)
                    self.step("eval", self.evaluate)
                if "draft" in self.parts:
                    self.step("draft acceptance", self.draft_acceptance)
                if "greedy" in self.parts:
                    self.step("lmdeploy greedy", self.lmdeploy_greedy)
                if self.parts & {"bench", "c1-latency"}:
                    self.step("bench", self.bench)
        finally:
            self.step("stop", self.stop)
            self.collect()
        log(f"done; errors: {[e['step'] for e in self.R['errors']]}")
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-pipe-out"))
    ap.add_argument("--work", default="/root/pipe")
    ap.add_argument("--deadline", type=float, default=time.time() + 540)
    ap.add_argument("--quantize-timeout-s", type=float, default=240)
    ap.add_argument("--ready-timeout-s", type=float, default=260)
    ap.add_argument("--no-lmdeploy", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--smol", help="the bf16 checkpoint (default /root/smol)")
    ap.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)} (default: all)")
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - set(PARTS) if args.only else set()
    if unknown:
        ap.error(
            f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}"
        )
    if args.dry_run:
        global CK, SMOL
        CK = Path(args.work) / "ck"
        SMOL = args.smol or SMOL
    elif args.smol:
        SMOL = args.smol
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main())
