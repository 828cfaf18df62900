"""`gateway serve --workers N`: N front-door processes on one listening socket, and one
control process that owns the engines which launch processes or load models.

Layout of one multi-process gateway (the process that runs `gateway serve` is the parent):

    parent ── control child  `gateway serve` on 127.0.0.1:<free port>, one process, serving
       │                     every model whose engine launches or loads something
       │                     (transformers, vllm, lmdeploy, sim); it starts, supervises and
       │                     stops them exactly as a one-process gateway does
       └─ uvicorn's supervisor ── N front doors, one socket bound once by the supervisor and
                                  inherited by every worker (the kernel spreads accepts);
                                  each front door serves the same catalog, rewritten so that
                                  in-process models (transformers, sim) are `engine: openai`
                                  endpoints on the control's loopback port, launched workers
                                  (vllm, lmdeploy) are attached by URL, and attach-mode
                                  models go straight to their workers

Launched workers are reached directly, not through the control process: the control
launches and supervises them on ports the parent fixes in advance (`options.base_port`),
and every front door attaches to those URLs with the model's own engine (its response
rewrites, routing, retries and continuation), so streams cost one relay hop and the
control process is off the data path. A worker the control restarts comes back on the
same port, which the front doors' health probes notice.

Front doors share keys, limits, usage and adapter desired state through the state store
when `GATEWAY_REDIS_URL` is set. Without Redis each front door has its own in-memory
limiter deciding at limit ÷ N, its own usage ledger, and serves only the adapters loaded
through itself: use Redis with N > 1 when adapters are loaded at run time. The control
process trusts only a random per-run token (its only client and admin key), passed to
front doors in the environment.

Stopping: Ctrl-C or SIGTERM to the parent stops the front doors (uvicorn's supervisor,
graceful), then the control process (SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`). uvicorn's
supervisor also restarts a front door that dies.

Not here: what a front door does with a request (`gateway.app`), engines' supervision of
their own workers (`engines.launch`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import yaml

from gateway.settings import Settings

CONTROL_KEY_ENV = "GATEWAY_CONTROL_KEY"
STOP_TIMEOUT_S = 60.0
# How long the control process may take to start its engines (vLLM loads take minutes).
START_TIMEOUT_S = 3600.0
# Spec fields a front door keeps for a control-owned model (the rest is the control's).
_FRONT_FIELDS = (
    "name",
    "task",
    "max_model_len",
    "max_tokens_default",
    "request_defaults",
    "lora",
)


# Engines whose workers the control launches and the front doors attach to by URL.
_LAUNCHED = ("vllm", "lmdeploy")


def _free_ports(host: str, n: int) -> int:
    """The first of `n` consecutive ports nothing listens on now."""
    for _ in range(100):
        base = _free_port(host)
        if base + n - 1 > 65535:
            continue
        try:
            for p in range(base + 1, base + n):
                with socket.socket() as s:
                    s.bind((host, p))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports on {host}")


def _attach_entry(entry: dict[str, Any], host: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the control's entry with fixed worker ports, the front doors' attach-mode entry)
    for a launched model: the front entry keeps everything but the launch-only keys."""
    from engines import engine_class
    from engines.launch.command import LaunchOptions
    from engines.upstream.options import UpstreamOptions

    options = dict(entry.get("options") or {})
    replicas = int(entry.get("replicas") or 1)
    if options.get("base_port") is None:
        options["base_port"] = _free_ports(host, replicas)
    base = int(options["base_port"])
    cls = engine_class(str(entry["engine"]))
    opts_model = getattr(cls, "options_model", LaunchOptions)
    launch_only = set(LaunchOptions.model_fields) - set(UpstreamOptions.model_fields)
    launch_only |= set(getattr(opts_model, "launch_only", ()))
    front = {
        k: v
        for k, v in entry.items()
        if k not in ("model", "replicas", "gpus_per_replica", "engine_args", "options")
    }
    front["endpoints"] = [f"http://{host}:{base + i}" for i in range(replicas)]
    front["options"] = {k: v for k, v in options.items() if k not in launch_only}
    return {**entry, "options": options}, front


def split_catalog(raw: dict[str, Any], control_url: str | None) -> tuple[list[Any], list[Any]]:
    """(the control's models, the front doors' models) of a models.yaml document."""
    control, front = [], []
    for entry in raw.get("models") or []:
        if entry.get("engine") == "openai" or entry.get("endpoints"):
            front.append(entry)
            continue
        if entry.get("engine") in _LAUNCHED:
            owned, attached = _attach_entry(entry, "127.0.0.1")
            control.append(owned)
            front.append(attached)
            continue
        control.append(entry)
        relay = {k: entry[k] for k in _FRONT_FIELDS if k in entry}
        relay.update(
            engine="openai",
            endpoints=[control_url or "http://127.0.0.1:1"],
            api_key_env=CONTROL_KEY_ENV,
            options={"start_timeout_s": 60.0},
        )
        front.append(relay)
    return control, front


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the control process exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"the control process was not healthy after {timeout:.0f} s")
        if now - last > 15:
            print(f"waiting for the control process at {url} ...", file=sys.stderr, flush=True)
            last = now
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_workers(settings: Settings) -> int:
    """Run the control process (if any model needs one) and N front doors until stopped."""
    import uvicorn

    config = settings.config.resolve()
    raw = yaml.safe_load(config.read_text()) or {}
    token = secrets.token_urlsafe(24)
    control_port = _free_port("127.0.0.1")
    control_url = f"http://127.0.0.1:{control_port}"
    control_models, front_models = split_catalog(raw, control_url)
    # Next to the original, so relative paths inside (models, adapter roots) still resolve.
    tag = f"{os.getpid()}"
    control_cfg = config.with_name(f".{config.stem}.control-{tag}.yaml")
    front_cfg = config.with_name(f".{config.stem}.front-{tag}.yaml")
    control: subprocess.Popen[bytes] | None = None
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        if control_models:
            control_cfg.write_text(yaml.safe_dump({**raw, "models": control_models}))
            env = {k: v for k, v in os.environ.items() if k != "GATEWAY_KEYS_FILE"}
            env |= {
                "GATEWAY_CONFIG": str(control_cfg),
                "GATEWAY_WORKERS": "1",
                "GATEWAY_API_KEYS": token,
                "GATEWAY_ADMIN_KEY": token,
                "GATEWAY_REDIS_URL": "",
                # Every front door's relay connections come from 127.0.0.1: the
                # per-address cap meant for clients would refuse them under load.
                "GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "1000000",
            }
            print(
                f"starting the control process for {len(control_models)} model(s) on {control_url}",
                file=sys.stderr,
                flush=True,
            )
            control = subprocess.Popen(
                [
                    *(sys.executable, "-m", "gateway", "serve", "--workers", "1"),
                    *("--host", "127.0.0.1", "--port", str(control_port)),
                ],
                env=env,
            )
            _wait_healthy(control_url, control, START_TIMEOUT_S)
        front_cfg.write_text(yaml.safe_dump({**raw, "models": front_models}))
        os.environ.update(
            {
                "GATEWAY_CONFIG": str(front_cfg),
                "GATEWAY_WORKERS": str(settings.workers),
                CONTROL_KEY_ENV: token,
            }
        )
        signal.signal(signal.SIGTERM, previous)
        print(
            f"starting {settings.workers} front doors on {settings.host}:{settings.port}",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            log_level=settings.log_level.lower(),
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=30,
        )
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(control)
        for path in (control_cfg, front_cfg):
            path.unlink(missing_ok=True)
