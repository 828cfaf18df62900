"""What a local checkpoint's own `quantization_config` holds, and whether that is what a
models.yaml entry declares with `quantization:`.

Owns reading config.json's `quantization_config` (also nested under `text_config` /
`llm_config`) into a `CheckpointQuant`, and the one rule both launched engines apply:
`quantization: awq|gptq` names how 4/8-bit integer weights were made, and is satisfied by
a checkpoint in that tool's own format (`quant_method` awq / gptq) or in the
compressed-tensors format llm-compressor writes for those recipes (weight-only integer
groups, `W4A16`/`W8A16`); `quantization: fp8` is satisfied by an FP8 checkpoint (`fp8`, or
compressed-tensors with 8-bit float weights) or by an unquantized one (quantized online).
Does not own the engines' flags (engines/launch/vllm.py, engines/launch/lmdeploy.py), which
decide from this what to pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CheckpointQuant", "read_checkpoint_quant"]


@dataclass(frozen=True, slots=True)
class CheckpointQuant:
    """A checkpoint's quantization as its config.json states it; `method` "" = none."""

    method: str
    config: dict[str, Any]
    # config.json's first `architectures` entry ("" when absent).
    architecture: str = ""

    @property
    def quantized(self) -> bool:
        return self.method != ""

    def ct_group(self) -> dict[str, Any] | None:
        """compressed-tensors: the only config group, when there is exactly one."""
        groups = self.config.get("config_groups")
        if self.method != "compressed-tensors" or not isinstance(groups, dict):
            return None
        if len(groups) != 1:
            return None
        g = next(iter(groups.values()))
        return g if isinstance(g, dict) else None

    def ct_scheme(self) -> str | None:
        """compressed-tensors: "W4A16", "W8A16", "FP8" (8-bit float weights, any
        activations), or None for anything else (several groups, int activations, …)."""
        g = self.ct_group()
        if g is None:
            return None
        w = g.get("weights") or {}
        acts = g.get("input_activations")
        bits, kind = w.get("num_bits"), w.get("type")
        if kind == "float" and bits == 8:
            return "FP8"
        if kind == "int" and bits in (4, 8) and acts is None:
            return f"W{bits}A16"
        return None

    def describe(self) -> str:
        if not self.quantized:
            return "unquantized"
        scheme = self.ct_scheme()
        return f"{self.method} {scheme}" if scheme else self.method

    def satisfies(self, declared: str) -> bool:
        """Whether this checkpoint serves as `quantization: declared` (see the module)."""
        if declared == "none":
            return not self.quantized
        if declared == "fp8":
            return self.method in ("", "fp8") or self.ct_scheme() == "FP8"
        if declared in ("awq", "gptq"):
            return self.method == declared or self.ct_scheme() in ("W4A16", "W8A16")
        return self.method == declared


def read_checkpoint_quant(model: str | Path) -> CheckpointQuant | None:
    """The quantization of a local checkpoint directory, or None when that cannot be known
    here (a hub id, a relative path, a file, an unreadable config)."""
    path = Path(model).expanduser()
    if not path.is_absolute() or not path.is_dir():
        return None
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    archs = cfg.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else ""
    for holder in (cfg, cfg.get("text_config"), cfg.get("llm_config")):
        if isinstance(holder, dict) and isinstance(holder.get("quantization_config"), dict):
            q = holder["quantization_config"]
            return CheckpointQuant(str(q.get("quant_method", "")).lower(), q, arch)
    return CheckpointQuant("", {}, arch)
