"""The engine registry: engine name → "module:Class", imported only when chosen.

Importing this package imports no engine module, so the gateway starts without torch,
vllm or lmdeploy unless models.yaml asks for the engine that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

ENGINES: dict[str, str] = {
    "transformers": "engines.local.engine:LocalEngine",
    "vllm": "engines.vllm:VLLMEngine",
    "lmdeploy": "engines.lmdeploy:LMDeployEngine",
    "openai": "engines.openai_http:OpenAIEngine",
    "sim": "engines.sim:SimEngine",
}


def engine_class(name: str) -> Any:
    """The engine class registered under `name` (imports its module now)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
