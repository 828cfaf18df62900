"""`gateway awq-export SRC --out DIR`: rewrite a compressed-tensors W4A16 pack-quantized
checkpoint (what `gateway quantize --method awq` writes with llm-compressor) as an AutoAWQ
GEMM checkpoint, the format LMDeploy 0.18's PyTorch engine loads for every architecture
(its compressed-tensors path needs module prefixes that its Llama model does not pass) and
that vLLM serves with its awq_marlin kernel.

Owns: the checks of what can be converted (refused with the reason: `AwqExportError`),
the repacking of every quantized Linear, the AutoAWQ `quantization_config`, copying the
other files (tokenizer, chat template, generation config, records), and writing the result
atomically with an `awq_export.json` record. Does not own quantizing (pipeline/quantize.py)
or serving (engines/launch/*: `quantization: awq` accepts both formats). Pure torch +
safetensors on CPU, one shard in memory at a time; llm-compressor is not imported.

The integers are carried over exactly; only their packing changes, so the exported
checkpoint is the same AWQ result. Formats, as read in their sources:

- compressed-tensors 0.19.0 (compressors/pack_quantized/base.py and helpers.py):
  `weight_packed` int32 [out, in/8]: the int4 value q in [-8, 7] stored as q + 8, element
  i of a row at bits 4*(i % 8) of word i // 8; `weight_scale` [out, in/G] in the model
  dtype; `weight_zero_point` (asymmetric group/channel only) int8 z in [-8, 7] packed the
  same way along dim 0: int32 [out/8, in/G]; `weight_shape` [out, in]; `weight_g_idx`
  with group act-order. Dequantized: (q - z) * scale (z = 0 when symmetric).
- AutoAWQ GEMM (awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear`): `qweight` int32
  [in, out/8], `qzeros` int32 [in/G, out/8], `scales` fp16 [in/G, out]; unsigned values
  in [0, 15]; nibble i of a word holds column `AWQ_ORDER[i]` of its 8. Dequantized:
  (q - z) * scales. LMDeploy 0.18 (pytorch/kernels/cuda/awq_kernels.py `_unpack_weight`)
  and vLLM unpack the same order; LMDeploy forces fp16 for an awq model
  (pytorch/config.py `_update_torch_dtype`).

So q_awq = q_ct + 8 and z_awq = z_ct + 8 (z_awq = 8 when symmetric): the stored nibbles
are already the unsigned AWQ values and q_awq - z_awq = q_ct - z_ct exactly. The one
conversion that can lose anything is the scales' dtype (bf16 → fp16: exact for values
from 2**-17 up to 65504); it is checked per tensor, and a scale that does not survive is
refused unless `allow_rounded_scales`, which records how many were rounded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["AWQ_ORDER", "AwqExportError", "ExportPlan", "check_source", "export_autoawq"]

# AutoAWQ's interleave: nibble i of a packed word holds column AWQ_ORDER[i] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32
# Files rewritten here rather than copied.
_WEIGHT_INDEX = "model.safetensors.index.json"
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


class AwqExportError(ValueError):
    """A checkpoint or request the export refuses; one line saying what and why."""


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What `check_source` found: the checkpoint's config and its one weight scheme."""

    src: Path
    config: dict[str, Any]
    group_size: int
    symmetric: bool
    ignore: list[str] = field(default_factory=list)


def check_source(src: Path) -> ExportPlan:
    """Read SRC's config.json and refuse anything AutoAWQ GEMM cannot express. Needs no
    torch: runs before anything heavy is imported."""
    src = src.expanduser()
    if not src.is_dir():
        raise AwqExportError(f"{src} is not a checkpoint directory")
    try:
        cfg = json.loads((src / "config.json").read_text())
    except OSError as e:
        raise AwqExportError(f"{src} has no readable config.json ({e.strerror})") from None
    except ValueError:
        raise AwqExportError(f"{src}/config.json is not JSON") from None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict):
        raise AwqExportError(f"{src} is not quantized (config.json has no quantization_config)")
    method = str(q.get("quant_method", "")).lower()
    if method == "awq":
        raise AwqExportError(f"{src} is already an AutoAWQ checkpoint")
    if method != "compressed-tensors":
        raise AwqExportError(f"{src} is quantized with {method!r}, not compressed-tensors")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        n = len(groups) if isinstance(groups, dict) else 0
        raise AwqExportError(
            f"{src} has {n} quantization config groups; AutoAWQ holds one scheme for all layers"
        )
    group = next(iter(groups.values()))
    if not isinstance(group, dict):
        raise AwqExportError(f"{src}: malformed config group")
    fmt = group.get("format") or q.get("format")
    if fmt != "pack-quantized":
        raise AwqExportError(f"{src} is in the {fmt!r} format; only pack-quantized is converted")
    if q.get("quantization_status", "compressed") != "compressed":
        raise AwqExportError(f"{src} is not saved compressed ({q.get('quantization_status')})")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if q.get(key):
            raise AwqExportError(f"{src} carries a {key}, which AutoAWQ cannot express")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise AwqExportError(f"{src}: the config group quantizes no weights")
    if group.get("input_activations") or group.get("output_activations"):
        raise AwqExportError(
            f"{src} quantizes activations too; AutoAWQ is weight-only (W4A16 converts)"
        )
    if w.get("type") != "int" or w.get("num_bits") != 4:
        raise AwqExportError(
            f"{src} has {w.get('num_bits')}-bit {w.get('type')} weights; AutoAWQ GEMM is "
            "4-bit int only"
        )
    if w.get("dynamic"):
        raise AwqExportError(f"{src} quantizes weights dynamically; AutoAWQ stores them static")
    if w.get("actorder") not in (None, "static"):
        # Group act-order stores a column → group map (weight_g_idx) AutoAWQ has no slot for.
        raise AwqExportError(
            f"{src} uses act-order {w.get('actorder')!r} (a g_idx per column); AutoAWQ "
            "groups are contiguous columns"
        )
    size = w.get("group_size")
    if w.get("strategy") != "group" or not isinstance(size, int) or size <= 0:
        raise AwqExportError(
            f"{src} is quantized per {w.get('strategy')} without groups; AutoAWQ's one "
            "group_size cannot express that for layers of different input widths "
            "(quantize with --group-size 128, 64 or 32)"
        )
    if size % PACK:
        raise AwqExportError(f"group size {size} is not a multiple of {PACK}")
    ignore = [str(x) for x in q.get("ignore") or []]
    regex = [x for x in ignore if x.startswith("re:")]
    if regex:
        raise AwqExportError(
            f"{src} ignores layers by pattern ({', '.join(regex)}); AutoAWQ's "
            "modules_to_not_convert takes module names"
        )
    return ExportPlan(src, cfg, size, bool(w.get("symmetric")), ignore)


def autoawq_config(plan: ExportPlan) -> dict[str, Any]:
    """The AutoAWQ `quantization_config` (read by vLLM's AWQConfig/AWQMarlinConfig
    from_config and LMDeploy's QuantizationConfig.from_config)."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": plan.group_size,
        # Always true: a symmetric source gets explicit zero points of 8, the same weights.
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": plan.ignore or None,
    }


# ------------------------------------------------------------------------ tensors


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] → int64 [..., n*8]: the eight 4-bit fields of each word, lowest
    first (compressed-tensors' order), as unsigned values 0..15."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    return ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).flatten(-2)


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int64 [rows, cols] of 0..15 → int32 [rows, cols/8] in AutoAWQ's nibble order."""
    import torch

    rows, cols = values.shape
    v = values.reshape(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    word = (v << shifts).sum(-1)  # fields do not overlap: sum == bitwise or
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


@dataclass(slots=True)
class _Counts:
    layers: int = 0
    scales_rounded: int = 0


def _convert_layer(
    prefix: str,
    t: dict[str, torch.Tensor],
    plan: ExportPlan,
    counts: _Counts,
    allow_rounded: bool,
) -> dict[str, torch.Tensor]:
    """One quantized Linear's compressed-tensors tensors → its AutoAWQ tensors."""
    import torch

    g = plan.group_size
    if f"{prefix}.weight_g_idx" in t:
        raise AwqExportError(f"{prefix} has a weight_g_idx (act-order); AutoAWQ cannot hold it")
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        if f"{prefix}.{part}" not in t:
            raise AwqExportError(f"{prefix}: {part} is missing")
    packed = t[f"{prefix}.weight_packed"]
    scale = t[f"{prefix}.weight_scale"]
    out_f, in_f = (int(x) for x in t[f"{prefix}.weight_shape"].tolist())
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise AwqExportError(f"{prefix}.weight_packed is {packed.dtype} {list(packed.shape)}")
    if out_f % PACK or in_f % g:
        raise AwqExportError(
            f"{prefix} is [{out_f}, {in_f}]: AutoAWQ needs out features divisible by {PACK} "
            f"and in features by the group size {g}"
        )
    if list(packed.shape) != [out_f, in_f // PACK] or list(scale.shape) != [out_f, in_f // g]:
        raise AwqExportError(
            f"{prefix}: packed {list(packed.shape)} / scale {list(scale.shape)} do not fit "
            f"shape [{out_f}, {in_f}] with group size {g}"
        )
    q = _nibbles(packed)[:, :in_f]  # [out, in], unsigned = q_ct + 8
    zp_name = f"{prefix}.weight_zero_point"
    if plan.symmetric:
        # compressed-tensors drops a symmetric zero point; one kept must be all zero
        # (packed: every field 8; unpacked: 0).
        if zp_name in t:
            zp = t[zp_name]
            zero = _nibbles(zp).eq(8) if zp.dtype == torch.int32 else zp.eq(0)
            if not bool(zero.all()):
                raise AwqExportError(f"{prefix}: a symmetric scheme with non-zero zero points")
        z = torch.full((out_f, in_f // g), 8, dtype=torch.int64)
    else:
        if zp_name not in t:
            raise AwqExportError(f"{prefix}: asymmetric scheme without weight_zero_point")
        zp = t[zp_name]
        if zp.dtype != torch.int32 or list(zp.shape) != [out_f // PACK, in_f // g]:
            raise AwqExportError(f"{prefix}.weight_zero_point is {zp.dtype} {list(zp.shape)}")
        z = _nibbles(zp.t().contiguous()).t()[:out_f]  # packed along dim 0 → [out, in/G]
    scales = scale.t().contiguous()
    half = scales.to(torch.float16)
    rounded = int((half.to(torch.float64) != scales.to(torch.float64)).sum())
    if rounded:
        if not bool(torch.isfinite(half).all()):
            raise AwqExportError(f"{prefix}: scales overflow fp16 (AutoAWQ stores fp16 scales)")
        if not allow_rounded:
            raise AwqExportError(
                f"{prefix}: {rounded} scale(s) are not exact in fp16 (AutoAWQ stores fp16 "
                "scales); pass --allow-rounded-scales to round them"
            )
        counts.scales_rounded += rounded
    counts.layers += 1
    return {
        f"{prefix}.qweight": _pack_awq(q.t().contiguous()),
        f"{prefix}.qzeros": _pack_awq(z.t().contiguous()),
        f"{prefix}.scales": half,
    }


def _convert_shard(
    names: list[str],
    read: _Reader,
    plan: ExportPlan,
    counts: _Counts,
    allow_rounded: bool,
) -> dict[str, torch.Tensor]:
    """The output tensors for one source shard's `names`; `read` fetches any tensor of
    the checkpoint (a layer's pieces may sit in another shard)."""
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted({k.rsplit(".", 1)[0] for k in names if k.endswith(".weight_packed")})
    for prefix in prefixes:
        layer = {
            f"{prefix}.{leaf}": read(f"{prefix}.{leaf}")
            for leaf in (*_SUFFIXES, "weight_g_idx")
            if f"{prefix}.{leaf}" in read.names
        }
        out.update(_convert_layer(prefix, layer, plan, counts, allow_rounded))
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf in (*_SUFFIXES, "weight_g_idx"):
            if f"{prefix}.weight_packed" not in read.names:
                raise AwqExportError(f"{name} has no weight_packed beside it")
            continue
        out[name] = read(name)  # unquantized tensors (embeddings, norms, lm_head, biases)
    return out


class _Reader:
    """Any tensor of a (possibly sharded) safetensors checkpoint, read on demand."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self.handles = handles
        # safe_open handles have keys() but are not iterable.
        self.where = {name: s for s, h in handles.items() for name in h.keys()}  # noqa: SIM118
        self.names = frozenset(self.where)

    def __call__(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)  # type: ignore[no-any-return]


def export_autoawq(
    src: Path,
    out: Path,
    *,
    force: bool = False,
    allow_rounded_scales: bool = False,
    progress: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Convert SRC into OUT (written to a temporary sibling, renamed into place); returns
    the `awq_export.json` record."""
    plan = check_source(src)
    out = out.expanduser().resolve()
    if out == plan.src.resolve():
        raise AwqExportError("--out must differ from the source checkpoint")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise AwqExportError(f"--out {out} exists and is not empty (pass --force to replace it)")
    sharded = (plan.src / _WEIGHT_INDEX).is_file()
    if sharded:
        index = json.loads((plan.src / _WEIGHT_INDEX).read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
    else:
        shards = sorted(p.name for p in plan.src.glob("*.safetensors"))
    if not shards:
        raise AwqExportError(f"{plan.src} holds no .safetensors weights")

    from safetensors import safe_open
    from safetensors.torch import save_file

    counts = _Counts()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with contextlib.ExitStack() as stack:
            handles = {
                s: stack.enter_context(safe_open(str(plan.src / s), framework="pt")) for s in shards
            }
            read = _Reader(handles)
            weight_map: dict[str, str] = {}
            total = 0
            for shard in shards:
                names = sorted(handles[shard].keys())
                converted = _convert_shard(names, read, plan, counts, allow_rounded_scales)
                save_file(converted, str(tmp / shard), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(converted, shard))
                total += sum(x.numel() * x.element_size() for x in converted.values())
                progress(f"{shard}: {len(converted)} tensors")
        if counts.layers == 0:
            raise AwqExportError(f"{plan.src} has no weight_packed tensors")
        if sharded:
            new_index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / _WEIGHT_INDEX).write_text(json.dumps(new_index, indent=2) + "\n")
        cfg = dict(plan.config)
        cfg["quantization_config"] = autoawq_config(plan)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for p in plan.src.iterdir():
            rewritten = p.suffix == ".safetensors" or p.name in ("config.json", _WEIGHT_INDEX)
            if p.is_file() and not rewritten:
                shutil.copy2(p, tmp / p.name)  # tokenizer, chat template, records
        record = {
            "source": str(plan.src),
            "group_size": plan.group_size,
            "symmetric_source": plan.symmetric,
            "layers": counts.layers,
            "scales_rounded": counts.scales_rounded,
            "quantization_config": cfg["quantization_config"],
        }
        (tmp / "awq_export.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {out}: {counts.layers} layers in AutoAWQ GEMM format")
    return record
