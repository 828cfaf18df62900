"""The GPU trace check: one request's gateway span and vLLM's own span share a trace id, and
vLLM's span hangs under the gateway's upstream attempt. Runs ON the GPU machine (docs/gpu.md,
"Traces joined with vLLM's"), or here with `--dry-run` (the simulator instead of vLLM).

    PYTHONPATH=. python3 bench/gpu_trace.py --out "$OUT" --model /root/smol --deadline EPOCH_S
    .venv/bin/python bench/gpu_trace.py --dry-run --out /tmp/trace

Steps, in order, each bounded by `--deadline`:

1. the OTLP/HTTP receiver (`bench/otlp_receiver.py`) on a loopback port;
2. `vllm serve MODEL --otlp-traces-endpoint <receiver>/v1/traces` with
   `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf` (vLLM's default is gRPC) and
   `OTEL_SERVICE_NAME=vllm`, waited for on /health (dry run: a simulator worker, which
   notes the `traceparent` it gets but exports nothing);
3. `gateway serve` attached to it (`engine: vllm`, `endpoints:`; dry run `engine: openai`)
   with `GATEWAY_OTLP_ENDPOINT` = the receiver;
4. one chat request with the client's own `traceparent`, non-streamed, then one streamed;
5. the spans of each trace, waited for: the gateway's SERVER span (service llm-gateway),
   its `upstream attempt` span, and vLLM's span(s) (service vllm) with the same trace id;
   checks: the gateway span's parent is the client's span; vLLM's span's parent is the
   attempt's span id (what the gateway sent in `traceparent`).

Writes `results.json` (every span received, the checks, errors) and `vllm.log`,
`gateway.log` under --out. Everything it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_procs import (  # noqa: E402
    Spawned,
    attached_config,
    free_port,
    log,
    post,
    stop,
    vllm_serve,
    wait_http,
)
from bench.otlp_receiver import OTLPReceiver  # noqa: E402


def check(spans: list[dict[str, Any]], client_span: str) -> dict[str, Any]:
    """The checks on one trace's spans."""
    server = [s for s in spans if s["service"] == "llm-gateway" and s["kind"] == "SERVER"]
    attempts = [s for s in spans if s["name"] == "upstream attempt"]
    vllm = [s for s in spans if s["service"] == "vllm"]
    attempt_ids = {a["span_id"] for a in attempts}
    return {
        "gateway_span": bool(server),
        "gateway_parent_is_client": bool(server) and server[0]["parent_span_id"] == client_span,
        "attempts": len(attempts),
        "vllm_spans": [s["name"] for s in vllm],
        "vllm_parent_is_attempt": bool(vllm)
        and all(s["parent_span_id"] in attempt_ids for s in vllm if s["parent_span_id"]),
        "gen_ai": {k: v for k, v in (server[0]["attributes"] if server else {}).items()
                   if k.startswith("gen_ai.")},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="/root/smol", help="the checkpoint vLLM serves")
    p.add_argument("--deadline", type=float, default=time.time() + 540, help="epoch seconds")
    p.add_argument("--dry-run", action="store_true", help="the simulator instead of vLLM")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dry_run": a.dry_run, "errors": [], "traces": {}}
    receiver = OTLPReceiver().start()
    traces = f"{receiver.url}/v1/traces"
    log(f"receiver on {traces}")
    worker: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    sim: Any = None
    sims: asyncio.AbstractEventLoop | None = None
    loop_thread: threading.Thread | None = None
    procs = Spawned()

    wport, gport = free_port(), free_port()
    try:
        # 2. the worker
        if a.dry_run:  # a simulator on an event loop of its own, in this process
            from simulator import SimServer

            sims = asyncio.new_event_loop()
            loop_thread = threading.Thread(target=sims.run_forever, daemon=True)
            loop_thread.start()
            sim = SimServer(model="smol", ttft_ms=20, itl_ms=2, output_tokens=16)
            run = asyncio.run_coroutine_threadsafe
            worker_url = run(sim.start("127.0.0.1", 0), sims).result(timeout=30)
        else:
            worker_url = f"http://127.0.0.1:{wport}"
            env = {
                **os.environ,
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "vllm",
            }
            cmd = vllm_serve(a.model, wport, "--otlp-traces-endpoint", traces)
            results["vllm_command"] = cmd
            worker = procs.start(cmd, a.out / "vllm.log", env)
        results["worker_ready_s"] = wait_http(f"{worker_url}/health", a.deadline, worker)
        log(f"worker ready: {worker_url}")

        # 3. the gateway, attached
        config = attached_config(
            a.out / "models.yaml", "openai" if a.dry_run else "vllm", worker_url
        )
        genv = {**os.environ, "GATEWAY_OTLP_ENDPOINT": receiver.url, "PYTHONPATH": str(REPO)}
        gateway = procs.start(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--port", str(gport)],
            a.out / "gateway.log",
            genv,
            cwd=REPO,
        )  # fmt: skip
        gw = f"http://127.0.0.1:{gport}"
        results["gateway_ready_s"] = wait_http(f"{gw}/health", a.deadline, gateway)
        log(f"gateway ready: {gw}")

        # 4-5. one request each way, each its own trace
        for stream in (False, True):
            trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
            body = {
                "model": "smol",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
                "stream": stream,
            }
            answer = post(
                f"{gw}/v1/chat/completions",
                body,
                {"traceparent": f"00-{trace_id}-{client_span}-01"},
            )
            log(f"answered ({'stream' if stream else 'whole'}): {answer[:160]!r}")

            def done(spans: list[dict[str, Any]]) -> bool:
                have = {(s["service"], s["kind"]) for s in spans}
                return ("llm-gateway", "SERVER") in have and (
                    a.dry_run or any(s["service"] == "vllm" for s in spans)
                )

            try:
                spans = receiver.wait_for(
                    trace_id, done, timeout=max(5.0, min(60.0, a.deadline - time.time()))
                )
            except TimeoutError as e:
                results["errors"].append(str(e))
                spans = receiver.trace(trace_id)
            key = "stream" if stream else "whole"
            results["traces"][key] = {
                "trace_id": trace_id,
                "client_span": client_span,
                "checks": check(spans, client_span),
                "spans": spans,
            }
            if sim is not None:  # the simulator notes what vLLM would parent its spans to
                got = [tp for tp in sim.traceparents if tp.split("-")[1] == trace_id]
                attempts = {s["span_id"] for s in spans if s["name"] == "upstream attempt"}
                results["traces"][key]["worker_traceparents"] = got
                results["traces"][key]["checks"]["worker_parent_is_attempt"] = bool(got) and all(
                    tp.split("-")[2] in attempts for tp in got
                )
            log(f"{key}: {json.dumps(results['traces'][key]['checks'])}")
    except Exception as e:
        results["errors"].append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        stop(gateway)
        stop(worker)
        if sims is not None:
            if sim is not None:
                asyncio.run_coroutine_threadsafe(sim.stop(), sims).result(timeout=30)
            sims.call_soon_threadsafe(sims.stop)
            if loop_thread is not None:
                loop_thread.join(timeout=10)
            sims.close()
        procs.close()
        receiver.stop()
        results["services"] = sorted({s["service"] or "" for s in receiver.spans})
        (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        log(f"results: {a.out / 'results.json'}; errors: {results['errors']}")
    ok = (
        all(
            t["checks"]["gateway_parent_is_client"]
            and (
                t["checks"].get("worker_parent_is_attempt")
                if a.dry_run
                else t["checks"]["vllm_spans"] and t["checks"]["vllm_parent_is_attempt"]
            )
            for t in results["traces"].values()
        )
        and len(results["traces"]) == 2
    )
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
