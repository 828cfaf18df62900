"""The engine registry: the one list of engine names, each → "module:Class", imported
only when chosen.

Importing this package imports no engine module, so the gateway starts without torch,
vllm or lmdeploy unless models.yaml asks for the engine that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.base import Engine

ENGINES: dict[str, str] = {
    "transformers": "engines.local.engine:LocalEngine",
    "vllm": "engines.launch.vllm:VLLMEngine",
    "lmdeploy": "engines.launch.lmdeploy:LMDeployEngine",
    "openai": "engines.upstream.engine:OpenAIEngine",
    "sim": "engines.sim:SimEngine",
}


def engine_class(name: str) -> type[Engine]:
    """The engine class registered under `name` (imports its module now)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
    module_name, _, attr = target.partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module_name), attr)
    return cls
