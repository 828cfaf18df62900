"""`gateway awq-export` on CPU (issue 13): a compressed-tensors W4A16 pack-quantized
checkpoint is built here (a plain round-to-nearest group quantizer and packer written in
this file after compressed-tensors 0.19.0's own code), converted, and the AutoAWQ tensors
are unpacked with an unpacker written here after LMDeploy 0.18's kernel: the integers and
the dequantized weights must equal the source's exactly. Plus what is refused, and the
command line.

Sources the helpers below follow (read in the released wheels):
- compressed-tensors 0.19.0, quantization/utils/helpers.py `calculate_qparams` (asymmetric:
  scale (max - min) / 15 with min <= 0 <= max, zero point clamp(round(-8 - min/scale));
  symmetric: scale max|w| / 7.5), lifecycle/forward_helpers.py (q = clamp(round(w/scale +
  z), -8, 7); dequantized (q - z) * scale), compressors/pack_quantized/helpers.py
  `pack_to_int32` (value + 8, element i at bit 4*i of the row's bit stream; the zero point
  packed along dim 0).
- LMDeploy 0.18.0, pytorch/kernels/cuda/awq_kernels.py `_unpack_weight`: from each int32 it
  takes fields (0, 4), (1, 5), (2, 6), (3, 7) as f16 pairs and joins them so that output
  columns 0..7 are fields 0, 4, 1, 5, 2, 6, 3, 7; `awq_linear_kernel` computes
  (w - z) * s with raw 4-bit w and z.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from gateway.cli import main as gateway_main
from pipeline.awq_export import AwqExportError, export_autoawq

# Column c of each 8 comes from field LMDEPLOY_FIELD_OF_COLUMN[c] (awq_kernels.py).
LMDEPLOY_FIELD_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)
# SmolLM2-135M's Linear shapes [out, in]: hidden 576, 3 kv heads of 64, MLP 1536.
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


def rtn_quantize(
    w: torch.Tensor, group: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale bf16 [out, in/G], zero point int8 [out, in/G])."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / 7.5).to(torch.bfloat16)
        zp = torch.zeros_like(scale, dtype=torch.int8)
    else:
        scale = ((hi - lo) / 15).to(torch.bfloat16)
        zp = torch.clamp(torch.round(-8 - lo / scale.float()), -8, 7).to(torch.int8)
    q = torch.round(g / scale.float().unsqueeze(-1) + zp.float().unsqueeze(-1))
    q = q.clamp(-8, 7).to(torch.int8).reshape(out_f, in_f)
    return q, scale, zp


def ct_pack(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' 4-bit packing: value + 8, element i of a row (or of a column
    when dim=0) at bits 4*(i % 8) of word i // 8."""
    v = (q.to(torch.int64) + 8) if dim == 1 else (q.to(torch.int64) + 8).t()
    rows, cols = v.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        words |= v[:, i::8] << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def lmdeploy_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [rows, n/8] → int64 [rows, n] of 0..15, in LMDeploy's column order."""
    rows, words = packed.shape
    out = torch.empty(rows, words * 8, dtype=torch.int64)
    p = packed.to(torch.int64)
    for col, field in enumerate(LMDEPLOY_FIELD_OF_COLUMN):
        out[:, col::8] = (p >> (4 * field)) & 0xF
    return out


def llama_config(layers: int, qcfg: dict[str, Any] | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": layers,
        "vocab_size": 64,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    return cfg


def ct_qconfig(group: int, symmetric: bool, **weights: Any) -> dict[str, Any]:
    """quantization_config as llm-compressor 0.14 writes it for W4A16(_ASYM)."""
    w = {
        "num_bits": 4,
        "type": "int",
        "strategy": "group",
        "group_size": group,
        "symmetric": symmetric,
        "dynamic": False,
        "actorder": None,
        **weights,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "format": None}},
    }


def build_ct_checkpoint(
    root: Path,
    *,
    group: int = 64,
    symmetric: bool = False,
    layers: int = 2,
    shards: int = 1,
    shapes: dict[str, tuple[int, int]] = SHAPES,
) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """A small Llama checkpoint in compressed-tensors pack-quantized format, and the
    integers and scales each Linear was quantized to."""
    gen = torch.Generator().manual_seed(13)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(64, 576, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.ones(576, dtype=torch.bfloat16),
    }
    truth = {}
    for n in range(layers):
        tensors[f"model.layers.{n}.input_layernorm.weight"] = torch.rand(576, generator=gen).to(
            torch.bfloat16
        )
        for name, (out_f, in_f) in shapes.items():
            # Heavy tails and an offset: asymmetric groups get varied zero points.
            w = torch.randn(out_f, in_f, generator=gen) ** 3 * 0.02 + 0.01
            q, scale, zp = rtn_quantize(w.to(torch.bfloat16), group, symmetric)
            prefix = f"model.layers.{n}.{name}"
            tensors[f"{prefix}.weight_packed"] = ct_pack(q)
            tensors[f"{prefix}.weight_scale"] = scale
            tensors[f"{prefix}.weight_shape"] = torch.tensor([out_f, in_f])
            if not symmetric:
                tensors[f"{prefix}.weight_zero_point"] = ct_pack(zp, dim=0)
            truth[prefix] = (q, scale, zp)
    root.mkdir(parents=True)
    qcfg = ct_qconfig(group, symmetric)
    (root / "config.json").write_text(json.dumps(llama_config(layers, qcfg)))
    (root / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    (root / "chat_template.jinja").write_text("{{ messages }}")
    (root / "quantize.json").write_text('{"method": "awq"}')
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
    else:
        # Round-robin by name: a layer's packed weight and its scale land in different files.
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s::shards]}
            save_file(part, str(root / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root, truth


def load_all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    ("symmetric", "group", "shards"), [(False, 64, 1), (True, 32, 1), (False, 128, 3)]
)
def test_export_carries_every_integer_over_exactly(
    tmp_path: Path, symmetric: bool, group: int, shards: int
) -> None:
    # 576 (SmolLM2's hidden width) does not divide by 128: that case takes the
    # 1536-wide down_proj alone.
    shapes = {"mlp.down_proj": SHAPES["mlp.down_proj"]} if group == 128 else SHAPES
    src, truth = build_ct_checkpoint(
        tmp_path / "ct", group=group, symmetric=symmetric, shards=shards, shapes=shapes
    )
    out = tmp_path / "awq"
    lines: list[str] = []
    record = export_autoawq(src, out, progress=lines.append)
    assert record["layers"] == len(truth) and record["scales_rounded"] == 0
    assert lines[-1].startswith(f"wrote {out}")

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"] == ["LlamaForCausalLM"]
    for name in ("tokenizer_config.json", "chat_template.jinja", "quantize.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((out / "awq_export.json").read_text())["source"] == str(src)
    if shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}

    src_t, got = load_all(src), load_all(out)
    for prefix, (q, scale, zp) in truth.items():
        out_f, in_f = q.shape
        qweight, qzeros, scales = (got[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
        assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        assert list(qweight.shape) == [in_f, out_f // 8]
        assert list(qzeros.shape) == [in_f // group, out_f // 8]
        assert list(scales.shape) == [in_f // group, out_f]
        w_awq, z_awq = lmdeploy_unpack(qweight), lmdeploy_unpack(qzeros)
        # The same integers: AutoAWQ's unsigned values are compressed-tensors' + 8.
        assert torch.equal(w_awq.t(), q.to(torch.int64) + 8)
        assert torch.equal(z_awq.t(), zp.to(torch.int64) + 8)
        if symmetric:
            assert bool((z_awq == 8).all())
        # The same weights, dequantized each format's way, compared exactly in float64.
        ct_z, ct_s = (x.double().repeat_interleave(group, 1) for x in (zp, scale))
        ct_w = (q.double() - ct_z) * ct_s
        awq_z, awq_s = (x.double().repeat_interleave(group, 0) for x in (z_awq, scales))
        awq_w = (w_awq.double() - awq_z) * awq_s
        assert torch.equal(awq_w.t(), ct_w)
        assert not any(k.startswith(prefix + ".weight") for k in got)
    for name, t in src_t.items():  # unquantized tensors, bit for bit
        if not any(name.startswith(p + ".weight") for p in truth):
            assert torch.equal(got[name], t) and got[name].dtype == t.dtype


def test_export_refusals(tmp_path: Path) -> None:
    src, _ = build_ct_checkpoint(tmp_path / "ct", layers=1)
    cfg = json.loads((src / "config.json").read_text())

    def variant(name: str, qcfg: dict[str, Any] | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(llama_config(1, qcfg)))
        for f in src.glob("*.safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
        return d

    base = cfg["quantization_config"]
    w = base["config_groups"]["group_0"]["weights"]

    def with_weights(**kw: Any) -> dict[str, Any]:
        q = json.loads(json.dumps(base))
        q["config_groups"]["group_0"]["weights"].update(kw)
        return q

    acts = json.loads(json.dumps(base))
    acts["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    fp8 = json.loads(json.dumps(base))
    fp8["format"] = "float-quantized"
    regex = json.loads(json.dumps(base))
    regex["ignore"] = ["lm_head", "re:.*mlp.gate$"]
    cases = [
        (None, "is not quantized"),
        ({"quant_method": "awq", "bits": 4}, "already an AutoAWQ checkpoint"),
        ({"quant_method": "gptq"}, "quantized with 'gptq'"),
        (with_weights(num_bits=8), "8-bit int weights; AutoAWQ GEMM is 4-bit int only"),
        (with_weights(actorder="group"), "act-order 'group'"),
        (with_weights(strategy="channel", group_size=None), "per channel without groups"),
        (with_weights(dynamic=True), "dynamically"),
        (acts, "quantizes activations too"),
        (fp8, "'float-quantized' format"),
        (regex, "ignores layers by pattern"),
    ]
    assert w["num_bits"] == 4
    for i, (qcfg, why) in enumerate(cases):
        with pytest.raises(AwqExportError, match=why.replace("(", r"\(")):
            export_autoawq(variant(f"v{i}", qcfg), tmp_path / f"o{i}")
        assert not (tmp_path / f"o{i}").exists()

    # A g_idx tensor (act-order written without saying so in the config).
    gidx = variant("gidx", base)
    t = load_file(str(gidx / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.zeros(576, dtype=torch.int32)
    save_file(t, str(gidx / "model.safetensors"))
    with pytest.raises(AwqExportError, match="weight_g_idx"):
        export_autoawq(gidx, tmp_path / "o-gidx")

    # Scales below fp16's exact range: refused, or rounded and counted when allowed.
    tiny = variant("tiny", base)
    t = load_file(str(tiny / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    t[name] = t[name].clone()
    t[name][0, 0] = torch.tensor(3.1e-8, dtype=torch.bfloat16)
    save_file(t, str(tiny / "model.safetensors"))
    with pytest.raises(AwqExportError, match="1 scale\\(s\\) are not exact in fp16"):
        export_autoawq(tiny, tmp_path / "o-tiny")
    record = export_autoawq(tiny, tmp_path / "o-tiny", allow_rounded_scales=True)
    assert record["scales_rounded"] == 1

    # An existing output directory is kept unless --force.
    with pytest.raises(AwqExportError, match="exists and is not empty"):
        export_autoawq(src, tmp_path / "o-tiny")
    assert export_autoawq(src, tmp_path / "o-tiny", force=True)["scales_rounded"] == 0
    with pytest.raises(AwqExportError, match="must differ"):
        export_autoawq(src, src, force=True)


def test_awq_export_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, truth = build_ct_checkpoint(tmp_path / "ct", layers=1)
    out = tmp_path / "awq"
    assert gateway_main(["awq-export", str(src), "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["layers"] == len(truth) and record["quantization_config"]["group_size"] == 64
    assert gateway_main(["awq-export", str(out), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gateway awq-export: {out} is already an AutoAWQ checkpoint"]
    assert gateway_main(["awq-export", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
