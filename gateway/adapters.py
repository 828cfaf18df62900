"""Which adapter paths may be loaded: inside a configured root, after symlinks, with
safetensors weights. A refused path never reaches a worker.

Owns only the path policy. Loading and unloading are the engines' (`Engine.load_adapter`);
bookkeeping of what is loaded where is `gateway.served`'s.
"""

from __future__ import annotations

from pathlib import Path

from engines.base import AdapterError
from engines.spec import ModelSpec


def resolve_adapter_path(spec: ModelSpec, raw: str, base_dir: Path) -> Path:
    """The real path of an adapter directory, or AdapterError saying why not."""
    if spec.lora is None:
        raise AdapterError(
            f"The model `{spec.name}` is not configured for LoRA adapters "
            "(no `lora` section in models.yaml).",
            param="base_model",
        )
    if not spec.lora.roots:
        raise AdapterError(
            f"The model `{spec.name}` has no `lora.roots`; runtime adapter "
            "loading is disabled for it.",
            param="lora_path",
        )
    if not raw or "\x00" in raw:
        raise AdapterError("'lora_path' must be a non-empty path.", param="lora_path")
    candidate = Path(raw)
    if not candidate.is_absolute():
        raise AdapterError("'lora_path' must be an absolute path.", param="lora_path")
    if ".." in candidate.parts:
        raise AdapterError("'lora_path' must not contain '..'.", param="lora_path")
    # resolve() follows every symlink, so a link pointing out of the root is caught here.
    real = candidate.resolve()
    roots = [(base_dir / r).resolve() for r in spec.lora.roots]
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise AdapterError(
            f"'lora_path' resolves outside the allowed adapter roots of `{spec.name}`.",
            param="lora_path",
        )
    if not real.is_dir():
        raise AdapterError("'lora_path' is not a directory.", param="lora_path")
    if not (real / "adapter_config.json").is_file():
        raise AdapterError("'lora_path' has no adapter_config.json.", param="lora_path")
    if not any(real.glob("*.safetensors")):
        raise AdapterError("'lora_path' holds no safetensors weights.", param="lora_path")
    return real
