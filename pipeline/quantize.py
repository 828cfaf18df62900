"""`gateway quantize MODEL --method awq|gptq|fp8 --out DIR`: make a quantized checkpoint
with llm-compressor that vLLM loads as it is (compressed-tensors format; the checkpoint's
own `quantization_config` tells the engine what it holds).

Owns: the method → recipe mapping, the argument checks and refusals (which run before
anything heavy is imported: no torch for a bad argument), reading calibration text (the
bundled set or the user's file), the group size choice, and writing the result atomically
with a `quantize.json` record beside the weights. Does not own serving the checkpoint
(models.yaml `quantization:` + engines/*), or installing llm-compressor: it is not a
dependency of the gateway (llmcompressor 0.14.0.1 pins transformers ≤ 5.17 and
compressed-tensors 0.19.0, which the gateway's own environment does not have), so it runs
where it is installed, with a GPU (docs/pipeline.md, docs/gpu.md).

Recipes (llmcompressor 0.14.0.1, read in its wheel):
- awq: `AWQModifier` (llmcompressor.modifiers.transform: activation-aware scaling) then
  `QuantizationModifier` with the scheme (default W4A16_ASYM: 4-bit int weights with zero
  points, 16-bit activations).
- gptq: `GPTQModifier` with the scheme (default W4A16, symmetric).
- fp8: `QuantizationModifier` with FP8 (default: static per-tensor weight and activation
  scales from calibration), FP8_DYNAMIC (per-channel weights, per-token activations at run
  time, no calibration) or FP8_BLOCK.
`lm_head` stays unquantized. Group-wise schemes need every quantized Linear's input width
to divide by the group size (llmcompressor refuses otherwise): the largest of 128, 64, 32
that divides them all is used unless --group-size says otherwise (SmolLM2-135M's hidden
width 576 takes 64).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CALIB",
    "METHODS",
    "QuantizeError",
    "QuantizeRequest",
    "check_request",
    "load_calibration",
    "quantize",
]

# method → (default scheme, allowed schemes)
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "awq": ("W4A16_ASYM", ("W4A16_ASYM", "W4A16")),
    "gptq": ("W4A16", ("W4A16", "W4A16_ASYM", "W8A16")),
    "fp8": ("FP8", ("FP8", "FP8_DYNAMIC", "FP8_BLOCK")),
}
# Schemes whose recipe reads no calibration data.
NO_CALIBRATION = frozenset({"FP8_DYNAMIC", "FP8_BLOCK"})
GROUP_SIZES = (128, 64, 32)
DEFAULT_CALIB = Path(__file__).parent / "calib" / "calibration.jsonl"
LLMCOMPRESSOR_PIN = "llmcompressor==0.14.0.1"


class QuantizeError(ValueError):
    """A request `quantize` refuses; one line saying what and why (exit status 2)."""


@dataclass(frozen=True, slots=True)
class QuantizeRequest:
    model: str
    method: str
    out: Path
    scheme: str
    calib: Path
    num_samples: int = 64
    max_seq_len: int = 512
    group_size: int | None = None
    force: bool = False
    allow_cpu: bool = False


def check_request(
    model: str,
    method: str,
    out: Path,
    *,
    scheme: str | None = None,
    calib: Path | None = None,
    num_samples: int = 64,
    max_seq_len: int = 512,
    group_size: int | None = None,
    force: bool = False,
    allow_cpu: bool = False,
) -> QuantizeRequest:
    """Every check that needs neither torch nor a GPU; raises QuantizeError."""
    if method not in METHODS:
        raise QuantizeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    default, allowed = METHODS[method]
    chosen = (scheme or default).upper()
    if chosen not in allowed:
        raise QuantizeError(
            f"--scheme {scheme} does not go with --method {method} (choose {', '.join(allowed)})"
        )
    if not 1 <= num_samples <= 4096:
        raise QuantizeError("--num-samples must be in 1..4096")
    if not 16 <= max_seq_len <= 32768:
        raise QuantizeError("--max-seq-len must be in 16..32768")
    if group_size is not None:
        if not chosen.startswith("W"):
            raise QuantizeError(f"--group-size applies to W*A16 schemes, not {chosen}")
        if group_size not in (*GROUP_SIZES, -1):
            raise QuantizeError("--group-size must be 128, 64, 32 or -1 (one per channel)")
    local = Path(model).expanduser()
    looks_local = model.startswith(("/", ".", "~")) or model.endswith(".gguf")
    if looks_local and not local.exists():
        raise QuantizeError(f"model {model} does not exist")
    if local.is_dir() and not (local / "config.json").is_file():
        raise QuantizeError(f"model {model} is a directory without config.json")
    out = out.expanduser().resolve()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"--out {out} exists and is not empty (pass --force to replace it)")
    if local.is_dir() and out == local.resolve():
        raise QuantizeError("--out must differ from the model directory")
    calib_path = (calib or DEFAULT_CALIB).expanduser()
    if chosen not in NO_CALIBRATION:
        texts = load_calibration(calib_path)  # raises on a bad file
        if not texts:
            raise QuantizeError(f"calibration file {calib_path} holds no text")
    return QuantizeRequest(
        model=model,
        method=method,
        out=out,
        scheme=chosen,
        calib=calib_path,
        num_samples=num_samples,
        max_seq_len=max_seq_len,
        group_size=group_size,
        force=force,
        allow_cpu=allow_cpu,
    )


def load_calibration(path: Path) -> list[str | list[dict[str, str]]]:
    """Calibration samples: a `.jsonl` file of {"text": …} or {"messages": [chat]} lines, or
    a plain text file whose paragraphs (blank-line separated) are the samples."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantizeError(f"cannot read calibration file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise QuantizeError(f"calibration file {path} is not UTF-8 text") from e
    if path.suffix != ".jsonl":
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    out: list[str | list[dict[str, str]]] = []
    for no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise QuantizeError(f"{path}:{no}: not JSON ({e})") from e
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            out.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            msgs = obj["messages"]
            if not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            ):
                raise QuantizeError(f"{path}:{no}: messages must be {{role, content}} strings")
            out.append(msgs)
        else:
            raise QuantizeError(f'{path}:{no}: expected {{"text": …}} or {{"messages": […]}}')
    return out


def require_gpu(allow_cpu: bool = False) -> str:
    """The GPU's name ("cpu" with `allow_cpu` and no GPU), or QuantizeError: the recipes
    calibrate layer by layer and are meant for CUDA; on CPU only a small model finishes
    in reasonable time (--cpu, for dry runs)."""
    import torch

    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    if allow_cpu:
        return "cpu"
    raise QuantizeError(
        "quantize needs a CUDA GPU and none is visible here; run it on a GPU machine "
        "(docs/pipeline.md), or pass --cpu to calibrate a small model slowly on CPU"
    )


def require_llmcompressor() -> str:
    try:
        import llmcompressor
    except ImportError as e:
        raise QuantizeError(
            f"llm-compressor is not installed ({e}); install {LLMCOMPRESSOR_PIN} in an "
            "environment with transformers 5.15-5.17 (see docs/pipeline.md)"
        ) from e
    return str(getattr(llmcompressor, "__version__", "?"))


def _group_size(model: Any, wanted: int | None) -> int | None:
    """`wanted`, or the largest of GROUP_SIZES dividing every quantized Linear's input."""
    import torch

    if wanted is not None:
        return wanted
    widths = {
        m.in_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }
    for g in GROUP_SIZES:
        if all(w % g == 0 for w in widths):
            return g
    raise QuantizeError(
        f"no group size of {GROUP_SIZES} divides the Linear input widths {sorted(widths)}; "
        "use --group-size -1"
    )


def _recipe(req: QuantizeRequest, group_size: int | None) -> list[Any]:
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = preset_name_to_scheme(req.scheme, ["Linear"])
    w = scheme.weights
    strategy = str(getattr(w.strategy, "value", w.strategy)) if w is not None else ""
    if w is not None and group_size is not None and strategy == "group":
        args = w.model_dump()
        if group_size == -1:
            args.update(strategy="channel", group_size=None)
        else:
            args.update(group_size=group_size)
        scheme = scheme.model_copy(update={"weights": QuantizationArgs.model_validate(args)})
    groups = {"group_0": scheme}
    if req.method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    quant = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if req.method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), quant]
    return [quant]


def _calibration_loader(req: QuantizeRequest, tokenizer: Any) -> Any:
    """The calibration samples, tokenised, as a torch DataLoader of one sample per batch
    (llmcompressor takes a DataLoader as it is: datasets/utils.py
    get_calibration_dataloader). Not a `datasets.Dataset`: building one fingerprints the
    data with dill, which fails on some pyarrow/dill pairs and buys nothing here."""
    import torch
    from torch.utils.data import DataLoader

    samples = load_calibration(req.calib)
    rows = []
    for s in samples[: req.num_samples]:
        text = s if isinstance(s, str) else tokenizer.apply_chat_template(s, tokenize=False)
        enc = tokenizer(text, max_length=req.max_seq_len, truncation=True, add_special_tokens=False)
        rows.append(
            {
                "input_ids": torch.tensor([enc["input_ids"]]),
                "attention_mask": torch.tensor([enc["attention_mask"]]),
            }
        )
    return DataLoader(rows, batch_size=None, shuffle=False)  # type: ignore[arg-type]


def quantize(
    req: QuantizeRequest,
    *,
    cache_dir: Path,
    progress: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Run the recipe and write the checkpoint; returns the `quantize.json` record."""
    gpu = require_gpu(req.allow_cpu)
    if gpu == "cpu" and req.method == "awq":
        # llmcompressor/pipelines/cache.py pins calibration tensors (pin_memory), which
        # needs an accelerator: "Cannot access accelerator device when none is available".
        raise QuantizeError("llm-compressor's AWQ needs a GPU even with --cpu (gptq, fp8 run)")
    version = require_llmcompressor()
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.model_source import resolve

    t0 = time.monotonic()
    path = resolve(req.model, config_dir=Path.cwd(), cache_dir=cache_dir, progress=progress)
    progress(f"loading {path} on {gpu}")
    device = "cpu" if gpu == "cpu" else "cuda"
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    group = _group_size(model, req.group_size) if req.scheme.startswith("W") else None
    recipe = _recipe(req, group)
    kwargs: dict[str, Any] = {}
    n = 0
    if req.scheme not in NO_CALIBRATION:
        loader = _calibration_loader(req, tokenizer)
        n = len(loader)
        kwargs = {"dataset": loader}
    progress(f"{req.method} {req.scheme}" + (f" group {group}" if group else "") + f", {n} samples")
    oneshot(model=model, recipe=recipe, **kwargs)
    req.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{req.out.name}.", dir=req.out.parent))
    record = {
        "model": req.model,
        "method": req.method,
        "scheme": req.scheme,
        "group_size": group,
        "calibration": None if not n else str(req.calib),
        "calibration_samples": n,
        "max_seq_len": req.max_seq_len,
        "llmcompressor": version,
        "gpu": gpu,
        "seconds": 0.0,
    }
    try:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        record["seconds"] = round(time.monotonic() - t0, 1)
        (tmp / "quantize.json").write_text(json.dumps(record, indent=2) + "\n")
        if req.out.exists():
            shutil.rmtree(req.out) if req.out.is_dir() else req.out.unlink()
        tmp.rename(req.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {req.out} in {record['seconds']} s")
    return record
