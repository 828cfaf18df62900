"""End to end through the gateway with the official `openai` SDK and the real embedded model
(SmolLM2-135M-Instruct and all-MiniLM-L6-v2 on CPU). Generations are kept short."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    ADMIN_KEY,
    CACHE,
    DEFAULT_MODEL,
    EMBED_MODEL,
    REPO,
    SMOL_REF,
    ServerThread,
)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(embedded_gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{embedded_gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def aclient(embedded_gateway: ServerThread) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{embedded_gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def test_chat_answers_from_the_real_model(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CAPITAL,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
    )
    assert resp.object == "chat.completion"
    assert resp.model == DEFAULT_MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.prompt_tokens > 5
    assert resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_request_defaults_apply_when_the_client_leaves_a_field_out(client: openai.OpenAI) -> None:
    # models.yaml says temperature 0 for this model: omitted, it is greedy (repeatable).
    outs = {
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CAPITAL,  # type: ignore[arg-type]
            max_tokens=8,
        )
        .choices[0]
        .message.content
        for _ in range(3)
    }
    greedy = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CAPITAL,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    assert outs == {greedy.choices[0].message.content}


def test_chat_stream_matches_non_streamed_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CAPITAL,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CAPITAL,
            max_tokens=10,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finish if f] == [whole.choices[0].finish_reason]


def test_stream_without_include_usage_has_no_usage_chunk(embedded_gateway: ServerThread) -> None:
    with httpx.stream(
        "POST",
        f"{embedded_gateway.url}/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": CAPITAL, "max_tokens": 4, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert not any(b'"usage"' in e for e in events)
    # ...but the gateway still counted the tokens.
    metrics = httpx.get(f"{embedded_gateway.url}/metrics").text
    assert f'gateway_completion_tokens_total{{model="{DEFAULT_MODEL}"}}' in metrics


def test_completions_n_and_stop(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=DEFAULT_MODEL, prompt="One, two, three,", max_tokens=8, n=2, temperature=1.0, seed=7
    )
    assert resp.object == "text_completion"
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage is not None and resp.usage.completion_tokens <= 16
    greedy = client.completions.create(
        model=DEFAULT_MODEL, prompt="One, two, three,", max_tokens=8, temperature=0
    )
    text = greedy.choices[0].text
    assert text
    cut = text.strip()[:2]
    stopped = client.completions.create(
        model=DEFAULT_MODEL, prompt="One, two, three,", max_tokens=8, temperature=0, stop=[cut]
    )
    assert cut not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_n_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CAPITAL,
            max_tokens=5,
            n=2,
            stream=True,  # type: ignore[arg-type]
            temperature=0.8,
            seed=1,
        )
    )
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert DEFAULT_MODEL in ids and EMBED_MODEL in ids
    model = client.models.retrieve(DEFAULT_MODEL)
    assert model.id == DEFAULT_MODEL and model.object == "model"


def test_embeddings_are_real_vectors(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(
        model=EMBED_MODEL,
        input=[
            "The cat sits on the mat.",
            "A cat is sitting on a rug.",
            "Stock markets fell today.",
        ],
    )
    vecs = [d.embedding for d in resp.data]
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vecs)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2
    assert resp.usage.prompt_tokens > 0
    b64 = client.embeddings.create(
        model=EMBED_MODEL, input="The cat sits on the mat.", encoding_format="base64"
    )
    raw = b64.data[0].embedding  # asked for explicitly, the SDK hands back the string
    assert isinstance(raw, str)
    decoded = struct.unpack(f"<{len(vecs[0])}f", base64.b64decode(raw))
    assert max(abs(a - b) for a, b in zip(decoded, vecs[0], strict=True)) < 1e-5


async def test_continuous_batching_shares_steps_and_admits_mid_way(
    aclient: openai.AsyncOpenAI, embedded_gateway: ServerThread
) -> None:
    engine = embedded_gateway.gateway.served.engines[DEFAULT_MODEL]
    first_token_at: dict[str, float] = {}
    done_at: dict[str, float] = {}
    all_started = asyncio.Event()

    async def one(tag: str, max_tokens: int) -> None:
        stream = await aclient.chat.completions.create(
            model=DEFAULT_MODEL,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": f"Write a long story about {tag}."}],
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_token_at.setdefault(tag, time.monotonic())
                if len(first_token_at) == 3:
                    all_started.set()
        done_at[tag] = time.monotonic()

    long_runs = [asyncio.create_task(one(f"dragon {i}", 48)) for i in range(3)]
    await asyncio.wait_for(all_started.wait(), timeout=60)
    late = asyncio.create_task(one("a late cat", 4))
    await asyncio.gather(*long_runs, late)
    assert engine.status().max_batch_seen > 1
    # The late request joined the running batch: it finished before the long ones did.
    assert done_at["a late cat"] < min(done_at[f"dragon {i}"] for i in range(3))


async def test_disconnected_stream_stops_generating_within_1s(
    embedded_gateway: ServerThread,
) -> None:
    engine = embedded_gateway.gateway.served.engines[DEFAULT_MODEL]
    body = {
        "model": DEFAULT_MODEL,
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Count to one thousand."}],
    }
    async with (
        httpx.AsyncClient(base_url=embedded_gateway.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        got = 0
        async for _ in r.aiter_bytes():
            got += 1
            if got >= 3:
                break
        assert engine.status().running == 1
    left_at = time.monotonic()
    while engine.status().running > 0:
        assert time.monotonic() - left_at < 1.0, "the abandoned sequence kept generating"
        await asyncio.sleep(0.02)


def _make_peft_adapter(out: Path) -> Path:
    """A real PEFT LoRA adapter for the default model, with strong random weights so that
    its effect on greedy output is visible."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engines.model_source import resolve

    path = resolve(SMOL_REF, config_dir=REPO, cache_dir=CACHE, progress=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero (a no-op): seeded weights that move decoding
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    return out


def test_lora_hot_swap_on_the_embedded_engine(
    client: openai.OpenAI, embedded_gateway: ServerThread, adapter_root: Path
) -> None:
    adapter = _make_peft_adapter(adapter_root / "strong")
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    base_before = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=8, temperature=0
    )  # type: ignore[arg-type]

    resp = httpx.post(
        f"{embedded_gateway.url}/v1/load_lora_adapter",
        headers=auth,
        json={"lora_name": "strong", "lora_path": str(adapter)},
    )
    assert resp.status_code == 200, resp.text
    listed = {m.id: m.model_extra for m in client.models.list()}
    assert listed["strong"] is not None and listed["strong"]["parent"] == DEFAULT_MODEL

    tuned = client.chat.completions.create(
        model="strong",
        messages=CAPITAL,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    assert tuned.model == "strong"
    assert tuned.choices[0].message.content != base_before.choices[0].message.content
    # The base model is untouched while the adapter is loaded.
    base_during = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL, max_tokens=8, temperature=0
    )  # type: ignore[arg-type]
    assert base_during.choices[0].message.content == base_before.choices[0].message.content

    resp = httpx.post(
        f"{embedded_gateway.url}/v1/unload_lora_adapter", headers=auth, json={"lora_name": "strong"}
    )
    assert resp.status_code == 200, resp.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="strong", messages=CAPITAL, max_tokens=2)  # type: ignore[arg-type]


def test_logprobs_through_the_sdk(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CAPITAL,  # type: ignore[arg-type]
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    lp = chat.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.content)
    text = "".join(t.token for t in lp.content)
    assert text == chat.choices[0].message.content
    comp = client.completions.create(
        model=DEFAULT_MODEL, prompt="One, two,", max_tokens=3, logprobs=2
    )
    clp = comp.choices[0].logprobs
    assert clp is not None and clp.tokens is not None and len(clp.tokens) == 3
    # a dict per token: two top tokens that decode alike share one key
    assert clp.top_logprobs is not None and all(1 <= len(d) <= 2 for d in clp.top_logprobs)
