"""The pipeline commands on CPU (issue 13): `gateway merge` end to end on the default model
with a LoRA adapter made here with peft (the merged model answers like base + adapter
through the gateway); `gateway eval` against the embedded engine with a fixed task set,
every score recomputed here by hand from the returned answers; the metric definitions on
hand-worked examples; `gateway quantize`'s argument checks and its refusal without a GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from gateway.cli import main as gateway_main
from pipeline import metrics
from pipeline.evaluate import EvalError, load_tasks
from pipeline.quantize import DEFAULT_CALIB, QuantizeError, check_request, load_calibration
from tests.conftest import CACHE, DEFAULT_MODEL, REPO, SMOL_REF, ServerThread, start_gateway

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- metrics


def test_metrics_on_hand_worked_examples() -> None:
    assert metrics.normalise("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("Paris.", ["paris"]) == 1.0
    assert metrics.exact_match("It is Paris", ["Paris"]) == 0.0
    assert metrics.contains("It is Paris.", ["Paris"]) == 1.0
    assert metrics.contains("Parisian food", ["Paris"]) == 0.0
    # LCS of [cat sat on mat] and [cat is on mat] is 3: P = R = 3/4, F1 = 3/4.
    assert metrics.rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == 0.75
    assert metrics.rouge_l("x", ["y"]) == 0.0
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; equal lengths: no brevity penalty.
    want = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert math.isclose(metrics.corpus_bleu(["x y z w v"], [["x y z w u"]]), want)
    # Half the reference length: brevity penalty exp(1 - 4/2); 4-grams: none in a 2-token
    # hypothesis, smoothed to 1/(0 + 1); 3-grams likewise.
    got = metrics.corpus_bleu(["x y"], [["x y z w"]])
    assert math.isclose(got, math.exp(1 - 2) * (1 * 1 * 1 * 1) ** 0.25)
    assert metrics.corpus_bleu(["q"], [["x y"]]) == 0.0
    choices = ["CO2", "H2O", "NaCl"]
    assert metrics.pick_choice("B", choices) == "B"
    assert metrics.pick_choice("The answer is (C).", choices) == "C"
    assert metrics.pick_choice("Water is H2O", choices) == "B"
    assert metrics.pick_choice("D", choices) is None


def test_task_file_checks(tmp_path: Path) -> None:
    bundled = load_tasks(REPO / "pipeline" / "tasks" / "basic.jsonl")
    assert {i.kind for i in bundled} == {"exact", "choice", "generate"} and len(bundled) == 24
    bad = tmp_path / "bad.jsonl"
    for line, why in (
        ('{"prompt": "q"}', "answer must be"),
        ('{"type": "choice", "prompt": "q", "choices": ["a", "b"], "answer": "C"}', "letters"),
        ('{"type": "quiz", "prompt": "q", "answer": "a"}', "type must be one of"),
        ("[1]", "JSON object"),
        ("{nope", "not JSON"),
    ):
        bad.write_text(line + "\n")
        with pytest.raises(EvalError, match=why):
            load_tasks(bad)


# --------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> ServerThread:
    tmp = tmp_path_factory.mktemp("pipe-eval")
    model = {
        "name": DEFAULT_MODEL,
        "engine": "transformers",
        "model": SMOL_REF,
        "request_defaults": {"temperature": 0},
    }
    server = start_gateway([model], tmp)
    yield server  # type: ignore[misc]
    server.stop()


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def test_eval_against_the_embedded_engine(
    embedded: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "t.jsonl"
    rows = [
        {"id": "e1", "type": "exact", "prompt": "What is the capital of France?", "answer": "Paris",
         "max_tokens": 12},
        {"id": "e2", "type": "exact", "prompt": "Say hello.", "answer": ["hello", "hi"],
         "max_tokens": 6},
        {"id": "c1", "type": "choice", "prompt": "Which is a colour?",
         "choices": ["Table", "Blue", "Seven"], "answer": "B", "max_tokens": 6},
        {"id": "g1", "type": "generate", "prompt": "What is the capital of France?",
         "answer": "The capital of France is Paris.", "max_tokens": 12},
        {"id": "g2", "type": "generate", "prompt": "Name a fruit.",
         "answer": "An apple is a fruit.", "max_tokens": 10},
    ]  # fmt: skip
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "report.json"
    rc = gateway_main(
        ["eval", "--base-url", embedded.url, "--model", DEFAULT_MODEL, "--task", str(task),
         "--concurrency", "3", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    run = report["models"][DEFAULT_MODEL]
    assert run["errors"] == []
    got = {r["id"]: r["prediction"] for r in run["results"]}
    assert set(got) == {"e1", "e2", "c1", "g1", "g2"} and all(got.values())

    # The answers are what the model says to the same greedy request.
    client = openai.OpenAI(base_url=f"{embedded.url}/v1", api_key="x")
    try:
        again = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=12, temperature=0
        )  # type: ignore[arg-type]
    finally:
        client.close()
    assert again.choices[0].message.content == got["e1"]

    # Recomputed by hand from the answers.
    def words(s: str) -> list[str]:
        s = "".join(c if c.isalnum() or c.isspace() else " " for c in s.lower())
        return [w for w in s.split() if w not in ("a", "an", "the")]

    em = [float(words(got["e1"]) == ["paris"]), float(words(got["e2"]) in (["hello"], ["hi"]))]
    contains = [
        float("paris" in words(got["e1"])),
        float(bool({"hello", "hi"} & set(words(got["e2"])))),
    ]
    first_letter = next((t for t in got["c1"].replace("(", " ").replace(".", " ").split()
                         if t in ("A", "B", "C")), None)  # fmt: skip
    if first_letter is None:  # no letter: the one choice named in the answer, if exactly one
        named = [ch for ch, c in zip("ABC", ["table", "blue", "seven"], strict=True)
                 if c in words(got["c1"])]  # fmt: skip
        first_letter = named[0] if len(named) == 1 else None
    f1 = []
    for gid, ref in (("g1", rows[3]["answer"]), ("g2", rows[4]["answer"])):
        p, r = words(got[gid]), words(str(ref))
        n = _lcs(p, r)
        f1.append(0.0 if n == 0 else 2 * (n / len(p)) * (n / len(r)) / (n / len(p) + n / len(r)))
    s = run["scores"]
    assert s["exact_match"] == sum(em) / 2
    assert s["contains"] == sum(contains) / 2
    assert s["choice_accuracy"] == float(first_letter == "B")
    assert math.isclose(s["rouge_l"], sum(f1) / 2)
    assert s["counts"] == {"exact": 2, "choice": 1, "generate": 2}
    # The table shows the same figures.
    assert f"{s['rouge_l']:.3f}" in table and "choice_accuracy (n=1)" in table


def test_eval_side_by_side_and_refusals(
    embedded: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "Say yes.", "answer": "yes", "max_tokens": 4}) + "\n")
    out = tmp_path / "r.json"
    # An unknown model is scored with its errors beside the real one.
    rc = gateway_main(
        ["eval", "--base-url", embedded.url, "--model", f"{DEFAULT_MODEL},nope",
         "--task", str(task), "--json", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["models"]) == [DEFAULT_MODEL, "nope"]
    assert report["models"][DEFAULT_MODEL]["errors"] == []
    err = report["models"]["nope"]["errors"]
    assert len(err) == 1 and err[0]["error"].startswith("HTTP 404")
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", DEFAULT_MODEL, "nope"]
    assert any(line.startswith("errors") and line.split()[1:] == ["0", "1"] for line in table)
    for argv, why in (
        (["--model", "a,a"], "twice"),
        (["--model", "a", "--concurrency", "0"], "concurrency"),
        (["--model", "a", "--task", str(tmp_path / "missing.jsonl")], "cannot read"),
    ):
        assert gateway_main(["eval", "--base-url", embedded.url, *argv]) == 2
        assert why in capsys.readouterr().err


# --------------------------------------------------------------------------- merge


def _adapter(out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engines.model_source import resolve

    path = resolve(SMOL_REF, config_dir=REPO, cache_dir=CACHE, progress=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    return out


def test_merge_answers_like_base_plus_adapter(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "adapter")
    merged = tmp_path / "merged"
    rc = gateway_main(["merge", SMOL_REF, str(adapter), "--out", str(merged)])
    assert rc == 0
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert (
        "chat_template.jinja" in files
        or "chat_template" in (merged / "tokenizer_config.json").read_text()
    )
    assert not any("lora" in k for k in json.loads((merged / "config.json").read_text()))
    # Merging again into the same place is refused without --force.
    assert gateway_main(["merge", SMOL_REF, str(adapter), "--out", str(merged)]) == 2

    base = {"engine": "transformers", "model": SMOL_REF, "request_defaults": {"temperature": 0}}
    server = start_gateway(
        [
            {
                "name": "base",
                **base,
                "lora": {"adapters": [{"name": "tuned", "path": str(adapter)}]},
            },
            {"name": "merged", "engine": "transformers", "model": str(merged)},
        ],
        tmp_path,
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    try:

        def ask(model: str) -> str:
            r = client.chat.completions.create(
                model=model, messages=CAPITAL, max_tokens=8, temperature=0
            )  # type: ignore[arg-type]
            return str(r.choices[0].message.content)

        tuned, merged_answer, plain = ask("tuned"), ask("merged"), ask("base")
    finally:
        client.close()
        server.stop()
    assert merged_answer == tuned
    assert tuned != plain  # the adapter matters, so the equality above says something


def test_merge_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    for adapter, why in (
        (tmp_path / "missing", "not a directory"),
        (tmp_path / "ia3", "only LoRA merges"),
    ):
        assert gateway_main(["merge", SMOL_REF, str(adapter), "--out", str(tmp_path / "o")]) == 2
        assert why in capsys.readouterr().err


# --------------------------------------------------------------------------- quantize


def test_quantize_argument_checks(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    req = check_request(str(model), "gptq", out)
    assert (req.scheme, req.calib, req.num_samples) == ("W4A16", DEFAULT_CALIB, 64)
    assert check_request(str(model), "awq", out).scheme == "W4A16_ASYM"
    assert check_request(str(model), "fp8", out, scheme="fp8_dynamic").scheme == "FP8_DYNAMIC"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "one"}\n{"oops": 1}\n')
    cases = [
        (dict(method="int3"), "--method must be one of awq, gptq, fp8"),
        (dict(method="awq", scheme="FP8"), "does not go with --method awq"),
        (dict(method="fp8", group_size=64), "applies to W*A16"),
        (dict(method="gptq", group_size=100), "128, 64, 32 or -1"),
        (dict(method="gptq", num_samples=0), "--num-samples"),
        (dict(method="gptq", out=full), "exists and is not empty"),
        (dict(method="gptq", out=model), "exists and is not empty"),
        (dict(method="gptq", calib=calib), "c.jsonl:2"),
        (dict(method="gptq", calib=tmp_path / "none.txt"), "cannot read calibration"),
        (dict(method="gptq", model=str(tmp_path / "nope")), "does not exist"),
        (dict(method="gptq", model=str(tmp_path)), "without config.json"),
    ]
    for kw, why in cases:
        args = {"model": str(model), "out": out, **kw}
        with pytest.raises(QuantizeError, match=why.replace("*", r"\*").replace("(", r"\(")):
            check_request(args.pop("model"), args.pop("method"), args.pop("out"), **args)
    # FP8_DYNAMIC needs no calibration text, so a broken --calib does not matter.
    assert check_request(str(model), "fp8", out, scheme="FP8_DYNAMIC", calib=calib).calib == calib


def test_bundled_calibration_set() -> None:
    samples = load_calibration(DEFAULT_CALIB)
    assert len(samples) == 58
    assert sum(isinstance(s, list) for s in samples) == 10


def test_quantize_refuses_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    p = subprocess.run(
        [sys.executable, "-m", "gateway", "quantize", str(model), "--method", "awq",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin",
                                                      "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert lines == [lines[0]] and "needs a CUDA GPU and none is visible" in lines[0]
    # A bad argument is refused before torch is imported (same status, same shape).
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gateway", "quantize", str(model),
         "--method", "awq", "--scheme", "FP8", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 2
    assert "does not go with --method awq" in p.stderr and "| torch" not in p.stderr


def test_gateway_imports_no_torch_for_other_commands() -> None:
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gateway", "check", "--config",
         str(REPO / "models.yaml")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    imported = {
        ln.split("|")[-1].strip().split(".")[0] for ln in p.stderr.splitlines() if "|" in ln
    }
    assert "pipeline" in imported  # the sub-commands are registered...
    assert not {"torch", "transformers", "peft", "llmcompressor"} & imported  # ...lazily
