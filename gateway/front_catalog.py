"""The catalogs of `gateway serve --workers N`: which models the control process runs and
what the front doors serve instead (`split_catalog`).

- In-process engines (transformers, sim) stay in the control process; a front door gets
  an `engine: openai` entry on the control's loopback port, authenticated by the per-run
  token in `CONTROL_KEY_ENV`.
- Launched workers (vllm, lmdeploy): the control launches and supervises them on ports
  fixed here (`options.base_port`), and a front door gets the same entry in attach mode
  (the workers' URLs, the launch-only options left out), so a stream takes one relay hop
  and a worker the control restarts comes back at the same URL.
- Attach-mode entries go to the front doors unchanged.

Does not own starting, watching or stopping any process (`gateway.workers`).
"""

from __future__ import annotations

import socket
from typing import Any

CONTROL_KEY_ENV = "GATEWAY_CONTROL_KEY"

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
        base = free_port(host)
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


def free_port(host: str) -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
