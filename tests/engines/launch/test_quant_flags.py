"""Quantization flags for launched engines, for checkpoints with and without their own
`quantization_config` (issue 13): what vLLM 0.26 and LMDeploy 0.18 are told, what is
refused at load, and LMDeploy's backend choice when its TurboMind extension is missing
(probed with a real interpreter and a stand-in `lmdeploy` package on PYTHONPATH)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from engines.base import EngineContext, EngineUnavailable
from engines.launch.checkpoint_quant import read_checkpoint_quant
from engines.launch.lmdeploy import LMDeployEngine, resolve_backend, turbomind_available
from engines.launch.vllm import VLLMEngine
from engines.spec import ModelSpec

REPO = Path(__file__).resolve().parents[3]


def ct_config(
    *, bits: int = 4, kind: str = "int", group: int | None = 64, sym: bool = False, acts: Any = None
) -> dict[str, Any]:
    """A quantization_config as llm-compressor 0.14 writes it (compressed-tensors)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if kind == "int" else "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": kind,
                    "strategy": "group" if group else "tensor",
                    "group_size": group,
                    "symmetric": sym,
                    "dynamic": False,
                },
                "input_activations": acts,
                "output_activations": None,
            }
        },
    }


FP8_ACTS = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}


def checkpoint(
    tmp: Path, name: str, qcfg: dict[str, Any] | None, arch: str = "LlamaForCausalLM"
) -> str:
    d = tmp / name
    d.mkdir()
    cfg: dict[str, Any] = {"architectures": [arch], "hidden_size": 576}
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def vspec(model: str, q: str, **kw: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": "smol", "engine": "vllm", "model": model, "quantization": q, **kw}
    )


def lspec(model: str, q: str, **kw: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": "smol", "engine": "lmdeploy", "model": model, "quantization": q, **kw}
    )


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# --------------------------------------------------------------------------- reading


def test_reading_quantization_configs(tmp_path: Path) -> None:
    awq = read_checkpoint_quant(checkpoint(tmp_path, "awq", ct_config()))
    assert awq is not None and awq.ct_scheme() == "W4A16"
    assert awq.satisfies("awq") and awq.satisfies("gptq") and not awq.satisfies("fp8")
    fp8 = read_checkpoint_quant(
        checkpoint(tmp_path, "fp8", ct_config(bits=8, kind="float", group=None, acts=FP8_ACTS))
    )
    assert fp8 is not None and fp8.ct_scheme() == "FP8"
    assert fp8.satisfies("fp8") and not fp8.satisfies("awq")
    plain = read_checkpoint_quant(checkpoint(tmp_path, "plain", None))
    assert plain is not None and not plain.quantized
    assert plain.satisfies("fp8") and not plain.satisfies("awq")
    # int weights with int activations (W8A8) are neither AWQ nor GPTQ output
    w8a8 = read_checkpoint_quant(
        checkpoint(tmp_path, "w8a8", ct_config(bits=8, acts={"num_bits": 8, "type": "int"}))
    )
    assert w8a8 is not None and not w8a8.satisfies("gptq")
    assert read_checkpoint_quant("HuggingFaceTB/SmolLM2-135M-Instruct") is None


# --------------------------------------------------------------------------- vLLM


@pytest.mark.parametrize("declared", ["awq", "gptq"])
def test_vllm_leaves_a_compressed_tensors_w4a16_checkpoint_to_its_config(
    tmp_path: Path, declared: str
) -> None:
    s = vspec(checkpoint(tmp_path, "ckpt", ct_config()), declared)
    assert VLLMEngine.check_spec(s) == []
    # No --quantization: vLLM reads compressed-tensors from config.json and picks the
    # kernel; "--quantization awq" would be a method mismatch (ValueError in vLLM).
    assert "--quantization" not in VLLMEngine.launch_commands(s)[0]


def test_vllm_leaves_autoawq_and_fp8_checkpoints_to_their_config(tmp_path: Path) -> None:
    awq = vspec(checkpoint(tmp_path, "a", {"quant_method": "awq", "bits": 4}), "awq")
    fp8 = vspec(
        checkpoint(tmp_path, "f", ct_config(bits=8, kind="float", group=None, acts=FP8_ACTS)),
        "fp8",
    )
    for s in (awq, fp8):
        assert VLLMEngine.check_spec(s) == []
        assert "--quantization" not in VLLMEngine.launch_commands(s)[0]


def test_vllm_online_fp8_stays_explicit(tmp_path: Path) -> None:
    s = vspec(checkpoint(tmp_path, "plain", None), "fp8")
    assert VLLMEngine.check_spec(s) == []
    assert flag(VLLMEngine.launch_commands(s)[0], "--quantization") == "fp8"


def test_vllm_unreadable_checkpoint_keeps_the_declared_method() -> None:
    # A hub id cannot be read here: vLLM itself checks the checkpoint against the flag.
    s = vspec("org/some-awq-model", "awq")
    assert flag(VLLMEngine.launch_commands(s)[0], "--quantization") == "awq"


def test_vllm_refuses_a_checkpoint_that_is_not_what_is_declared(tmp_path: Path) -> None:
    ct = checkpoint(tmp_path, "ct", ct_config())
    got = {i.path: i.message for i in VLLMEngine.check_spec(vspec(ct, "fp8"))}
    assert "quantized with 'compressed-tensors W4A16', not 'fp8'" in got["quantization"]
    plain = checkpoint(tmp_path, "plain", None)
    got = {i.path: i.message for i in VLLMEngine.check_spec(vspec(plain, "gptq"))}
    assert "is not GPTQ-quantized" in got["quantization"]


# --------------------------------------------------------------------------- LMDeploy


def test_lmdeploy_pytorch_engine_support_matrix_for_compressed_tensors(tmp_path: Path) -> None:
    pt = {"backend": "pytorch"}
    # llm-compressor's default AWQ output (asymmetric, group 64) is not what the PyTorch
    # engine loads (lmdeploy/pytorch/config.py: W4A16 symmetric group 32 only).
    asym = lspec(checkpoint(tmp_path, "asym", ct_config(), "Qwen3ForCausalLM"), "awq", options=pt)
    got = {i.path: i.message for i in LMDeployEngine.check_spec(asym)}
    assert "symmetric, group size 32" in got["options.backend"]
    g32 = ct_config(group=32, sym=True)
    ok = lspec(checkpoint(tmp_path, "qwen3", g32, "Qwen3ForCausalLM"), "awq", options=pt)
    assert LMDeployEngine.check_spec(ok) == []
    argv = LMDeployEngine.launch_commands(ok)[0]
    assert flag(argv, "--backend") == "pytorch" and "--model-format" not in argv
    # Llama's LMDeploy model passes no module prefixes, which compressed-tensors needs
    # ("compressed-tensors dispatch requires a non-empty canonical module prefix", seen
    # with SmolLM2 on the H200).
    llama = lspec(checkpoint(tmp_path, "llama", g32), "awq", options=pt)
    got = {i.path: i.message for i in LMDeployEngine.check_spec(llama)}
    assert "not LlamaForCausalLM" in got["options.backend"]


def test_lmdeploy_turbomind_reads_the_checkpoint_format_itself(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path, "g128", ct_config(group=128, sym=True))
    s = lspec(ckpt, "awq")
    assert resolve_backend(s) == "turbomind"
    assert LMDeployEngine.check_spec(s) == []
    # TurboMind asserts --model-format == the checkpoint's quant_method: leave it out.
    assert "--model-format" not in LMDeployEngine.launch_commands(s)[0]
    g64 = lspec(checkpoint(tmp_path, "g64", ct_config(group=64)), "awq")
    got = {i.path: i.message for i in LMDeployEngine.check_spec(g64)}
    assert "groups of 32 or 128" in got["quantization"]
    # An unreadable checkpoint on TurboMind keeps the declared format.
    hub = lspec("org/awq-model", "awq")
    assert flag(LMDeployEngine.launch_commands(hub)[0], "--model-format") == "awq"


def _stand_in_lmdeploy(root: Path, *, turbomind: bool) -> Path:
    """A package named lmdeploy whose turbomind.is_available() answers as told."""
    pkg = root / "lmdeploy"
    (pkg / "turbomind").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "turbomind" / "__init__.py").write_text(
        f"def is_available():\n    return {turbomind!r}\n"
    )
    return root


async def test_turbomind_probe_runs_the_workers_interpreter(tmp_path: Path) -> None:
    program = [sys.executable, "-m", "lmdeploy"]
    without = _stand_in_lmdeploy(tmp_path / "without", turbomind=False)
    with_tm = _stand_in_lmdeploy(tmp_path / "with", turbomind=True)
    assert await turbomind_available(program, {"PYTHONPATH": str(without)}) is False
    assert await turbomind_available(program, {"PYTHONPATH": str(with_tm)}) is True
    # No lmdeploy at all: cannot tell (LMDeploy would fail its own start anyway).
    assert await turbomind_available(program, {"PYTHONPATH": str(tmp_path)}) is None
    assert await turbomind_available(["/no/such/lmdeploy"], {}) is None


FAKE_LMDEPLOY = r"""
import sys
args = sys.argv[1:]
print("fake lmdeploy:", " ".join(args), flush=True)
def value(flag):
    return args[args.index(flag) + 1]
from simulator.__main__ import serve_main
sys.exit(serve_main(["--host", value("--server-name"), "--port", value("--server-port"),
                     "--model", value("--model-name")]))
"""


async def test_awq_goes_to_the_pytorch_engine_when_turbomind_is_missing(tmp_path: Path) -> None:
    # A stand-in `lmdeploy` console script (the simulator behind LMDeploy's CLI) whose
    # interpreter sees an lmdeploy package without TurboMind.
    site = _stand_in_lmdeploy(tmp_path / "site", turbomind=False)
    script = tmp_path / "bin" / "lmdeploy"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n{FAKE_LMDEPLOY}")
    script.chmod(0o755)
    ckpt = checkpoint(tmp_path, "awq", {"quant_method": "awq", "bits": 4, "version": "gemm"})
    opts = {"command": [str(script)], "env": {"PYTHONPATH": f"{site}:{REPO}"}}
    s = lspec(ckpt, "awq", options=opts)
    assert resolve_backend(s) == "turbomind"  # what config load sees
    assert flag(LMDeployEngine.launch_commands(s)[0], "--backend") == "turbomind"
    lines: list[str] = []
    engine = LMDeployEngine(s, EngineContext(tmp_path / "cache", tmp_path, lines.append))
    await engine.start()
    try:
        log = (tmp_path / "cache" / "logs" / "smol" / "lmdeploy_0_.log").read_text()
        launched = next(ln for ln in log.splitlines() if ln.startswith("fake lmdeploy:"))
        assert "--backend pytorch" in launched and "--model-format" not in launched
        assert any("TurboMind extension is not installed" in ln for ln in lines)
    finally:
        await engine.stop()


async def test_what_the_pytorch_engine_cannot_serve_is_refused_at_launch(tmp_path: Path) -> None:
    site = _stand_in_lmdeploy(tmp_path / "site", turbomind=False)
    opts = {"command": [sys.executable, "-m", "lmdeploy"], "env": {"PYTHONPATH": str(site)}}
    gptq = checkpoint(tmp_path, "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    llama_ct = checkpoint(tmp_path, "ct", ct_config(group=32, sym=True))
    for model, q, why in (
        (gptq, "gptq", "GPTQ runs on TurboMind only"),
        (llama_ct, "awq", "not LlamaForCausalLM"),
    ):
        s = lspec(model, q, options=opts)
        assert LMDeployEngine.check_spec(s) == []  # fine for TurboMind, as far as load knows
        engine = LMDeployEngine(s, EngineContext(tmp_path / "c", tmp_path, print))
        with pytest.raises(EngineUnavailable, match=why) as err:
            await engine.start_workers()
        assert "pytorch backend" in str(err.value)
        assert engine.supervisor is None  # nothing was launched


# --------------------------------------------------------------------------- AutoAWQ export


def autoawq(group: int = 64, **kw: Any) -> dict[str, Any]:
    """The quantization_config `gateway awq-export` writes (pipeline/awq_export.py)."""
    from pipeline.awq_export import ExportPlan, autoawq_config

    cfg = autoawq_config(ExportPlan(Path("/src"), {}, group, False, ["lm_head"]))
    return {**cfg, **kw}


def test_an_exported_autoawq_checkpoint_is_served_by_both_engines(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path, "awq", autoawq())
    found = read_checkpoint_quant(ckpt)
    assert found is not None and found.satisfies("awq") and not found.satisfies("gptq")
    # vLLM: no --quantization, so it picks awq_marlin from the config itself.
    v = vspec(ckpt, "awq")
    assert VLLMEngine.check_spec(v) == []
    assert "--quantization" not in VLLMEngine.launch_commands(v)[0]
    # LMDeploy's PyTorch engine loads AutoAWQ for a Llama model (its compressed-tensors
    # path needs module prefixes Llama does not pass); the config says what it is.
    s = lspec(ckpt, "awq", options={"backend": "pytorch"})
    assert LMDeployEngine.check_spec(s) == []
    argv = LMDeployEngine.launch_commands(s)[0]
    assert flag(argv, "--backend") == "pytorch" and "--model-format" not in argv
    # Declared as something else: refused, naming what the checkpoint holds.
    got = {i.path: i.message for i in LMDeployEngine.check_spec(lspec(ckpt, "gptq"))}
    assert "quantized with 'awq', not 'gptq'" in got["quantization"]


def test_lmdeploy_support_matrix_for_autoawq(tmp_path: Path) -> None:
    pt = {"backend": "pytorch"}
    # TurboMind takes AWQ in groups of 128 only; the message points at the PyTorch engine.
    g64 = lspec(checkpoint(tmp_path, "g64", autoawq(64)), "awq")
    got = {i.path: i.message for i in LMDeployEngine.check_spec(g64)}
    assert "group size 128 only, not 64; set options.backend: pytorch" in got["quantization"]
    assert LMDeployEngine.check_spec(lspec(checkpoint(tmp_path, "g128", autoawq(128)), "awq")) == []
    # The PyTorch engine's Triton kernel tiles K by the group: a power of two >= 16.
    for name, qcfg, why in (
        (
            "g48",
            autoawq(48),
            "power-of-two group size of at least 16 (its Triton kernel tiles by the group), not 48",
        ),
        ("chan", autoawq(-1), "not -1"),
        ("gemv", autoawq(64, version="gemv"), "GEMM layout, not 'gemv'"),
        ("b8", autoawq(64, bits=8), "4-bit AWQ only, not 8-bit"),
    ):
        got = {i.path: i.message for i in LMDeployEngine.check_spec(
            lspec(checkpoint(tmp_path, name, qcfg), "awq", options=pt))}  # fmt: skip
        assert why in got["options.backend"], got
    # A compressed-tensors AWQ checkpoint on Llama is pointed at the export.
    llama = lspec(checkpoint(tmp_path, "ct", ct_config(group=32, sym=True)), "awq", options=pt)
    got = {i.path: i.message for i in LMDeployEngine.check_spec(llama)}
    assert "gateway awq-export" in got["options.backend"]
