"""The catalogs of `gateway serve --workers N`: which models the control process runs and
what the front doors serve instead (`split_catalog`).

Each engine says where it runs (`Engine.placement`); this module names none.
- In-process engines stay in the control process; a front door gets
  an `engine: openai` entry on the control's loopback port, authenticated by the per-run
  token in `CONTROL_KEY_ENV`.
- Launched workers: the control launches and supervises them on ports fixed in advance
  (`options.base_port`, by the engine's `attach_entry`), and a front door gets the same
  entry in attach mode (the workers' URLs, the launch-only options left out), so a stream
  takes one relay hop and a worker the control restarts comes back at the same URL.
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


def split_catalog(raw: dict[str, Any], control_url: str | None) -> tuple[list[Any], list[Any]]:
    """(the control's models, the front doors' models) of a models.yaml document."""
    from engines import engine_class

    control, front = [], []
    for entry in raw.get("models") or []:
        cls = engine_class(str(entry.get("engine")))
        if cls.placement == "attached" or entry.get("endpoints"):
            front.append(entry)
            continue
        if cls.placement == "launched":
            owned, attached = cls.attach_entry(entry, "127.0.0.1")
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
