"""The simulator (the simulator package) as a vLLM stand-in: driven over real loopback HTTP with the
official `openai` SDK and httpx."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import httpx
import openai
import orjson
import pytest

from engines.upstream.prom_text import sum_samples
from simulator import SimConfig, SimServer
from simulator.behaviour import parse_gen
from simulator.config import config_from_args
from simulator.state import SimState

MODEL = "sim-m"


async def _server(**kw: object) -> SimServer:
    server = SimServer(SimConfig(model=MODEL, seed=1), **kw)
    await server.start("127.0.0.1", 0)
    return server


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await _server(output_tokens=5)
    yield server
    await server.stop()


def _client(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


async def _metrics(server: SimServer) -> dict[str, float]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{server.url}/metrics")
    return sum_samples(r.text, "vllm:")


async def test_chat_not_streamed(sim: SimServer) -> None:
    async with _client(sim) as client:
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one two three"}]
        )
    assert r.system_fingerprint == "gateway-sim"
    assert r.model == MODEL
    assert r.choices[0].message.content == " the quick brown fox jumps"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 5)


async def test_chat_streamed_with_usage(sim: SimServer) -> None:
    async with _client(sim) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " the quick brown fox"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.system_fingerprint == "gateway-sim" for c in chunks)


async def test_stream_without_usage_and_done_marker(sim: SimServer) -> None:
    async with (
        httpx.AsyncClient() as c,
        c.stream(
            "POST",
            f"{sim.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as r,
    ):
        body = b"".join([b async for b in r.aiter_bytes()])
    assert r.headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body


async def test_completions_and_n(sim: SimServer) -> None:
    async with _client(sim) as client:
        r = await client.completions.create(model=MODEL, prompt="a b c d", max_tokens=3, n=2)
        assert [c.index for c in r.choices] == [0, 1]
        assert r.choices[0].text == " the quick brown"
        assert r.choices[1].text == " quick brown fox"
        assert r.usage is not None and r.usage.completion_tokens == 6
        stream = await client.completions.create(
            model=MODEL, prompt="a", max_tokens=3, n=2, stream=True
        )
        per: dict[int, str] = {0: "", 1: ""}
        async for chunk in stream:
            for ch in chunk.choices:
                per[ch.index] += ch.text
    assert per == {0: " the quick brown", 1: " quick brown fox"}


async def test_models_and_embeddings(sim: SimServer) -> None:
    async with _client(sim) as client:
        models = await client.models.list()
        assert [(m.id, m.owned_by) for m in models.data] == [(MODEL, "gateway-sim")]
        # The SDK asks for base64 by default and decodes it.
        e1 = await client.embeddings.create(model=MODEL, input=["hello", "world"])
        e2 = await client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    assert len(e1.data) == 2 and len(e1.data[0].embedding) == 64
    assert e1.data[0].embedding == pytest.approx(e2.data[0].embedding, abs=1e-6)
    assert e1.data[0].embedding != e1.data[1].embedding


async def test_lora_load_use_unload(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as c, _client(sim) as client:
        body = {"lora_name": "ad1", "lora_path": "/adapters/ad1"}
        r = await c.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200 and "added successfully" in r.text
        r = await c.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400
        assert "has already been loaded" in r.json()["error"]["message"]
        listed = {m.id: m for m in (await client.models.list()).data}
        assert listed["ad1"].model_extra is not None
        assert listed["ad1"].model_extra["parent"] == MODEL
        out = await client.chat.completions.create(
            model="ad1", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert out.model == "ad1"
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "ad1"})
        assert r.status_code == 200
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "ad1"})
        assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError) as exc:
            await client.chat.completions.create(
                model="ad1", messages=[{"role": "user", "content": "x"}]
            )
    assert "does not exist" in str(exc.value)


async def test_latency_roughly_honoured() -> None:
    server = await _server(ttft_ms=120, itl_ms=30)
    try:
        async with _client(server) as client:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=5,
                stream=True,
            )
            stamps = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter() - t0)
    finally:
        await server.stop()
    assert len(stamps) == 5
    # Floors only: the simulator may be late on a busy machine, never early.
    assert stamps[0] >= 0.11
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert stamps[-1] - stamps[0] >= 0.1  # 4 gaps of 30 ms
    assert min(gaps) > 0.015


async def test_queueing_visible_in_metrics() -> None:
    server = await _server(max_running=1, itl_ms=150)
    try:
        async with _client(server) as client:
            calls = [
                asyncio.create_task(
                    client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=6
                    )
                )
                for _ in range(3)
            ]
            # Each request holds the one slot for ~0.9 s: watch until two are seen waiting
            # behind the running one (an event), never more than one running.
            seen: list[tuple[float, float, float]] = []
            while not all(c.done() for c in calls):
                m = await _metrics(server)
                seen.append(
                    (
                        m["vllm:num_requests_running"],
                        m["vllm:num_requests_waiting"],
                        m["vllm:kv_cache_usage_perc"],
                    )
                )
                if seen[-1][:2] == (1, 2):
                    break
                await asyncio.sleep(0.01)
            assert (1, 2) in [s[:2] for s in seen]
            assert max(s[0] for s in seen) == 1
            assert seen[-1][2] > 0
            await asyncio.gather(*calls)
        m = await _metrics(server)
        assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        assert m["vllm:generation_tokens_total"] == 18
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("status", "exc"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError),
     (400, openai.BadRequestError)],
)  # fmt: skip
async def test_error_injection(status: int, exc: type[Exception]) -> None:
    server = await _server(error_rate=1.0, error_status=status)
    try:
        async with _client(server) as client:
            with pytest.raises(exc) as info:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}]
                )
        assert "simulated fault" in str(info.value)
    finally:
        await server.stop()


async def test_drop_after_cuts_the_stream() -> None:
    server = await _server(drop_after=2, output_tokens=10)
    try:
        got = []
        async with httpx.AsyncClient() as c:
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream(
                    "POST",
                    f"{server.url}/v1/completions",
                    json={"model": MODEL, "prompt": "x", "stream": True},
                ) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            got.append(line)
        assert len(got) == 2
        assert server.running == 0
    finally:
        await server.stop()


async def test_stall() -> None:
    server = await _server(stall_ms=300, stall_after=1, output_tokens=3)
    try:
        stamps = []
        async with httpx.AsyncClient() as c:
            t0 = time.perf_counter()
            async with c.stream(
                "POST",
                f"{server.url}/v1/completions",
                json={"model": MODEL, "prompt": "x", "stream": True},
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.perf_counter() - t0)
        assert len(stamps) == 3
        assert stamps[1] - stamps[0] >= 0.28
    finally:
        await server.stop()


async def test_slow_start_and_api_key() -> None:
    # A start long enough to be seen on a busy box; then it ends by itself.
    server = await _server(startup_s=3.0, api_key="k")
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            assert (await c.get("/health")).status_code == 503
            codes = []
            for _ in range(300):  # up to 30 s
                codes.append((await c.get("/health")).status_code)
                if codes[-1] == 200:
                    break
                await asyncio.sleep(0.1)
            assert codes[-1] == 200
            r = await c.get("/v1/models")
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
            r = await c.get("/v1/models", headers={"Authorization": "Bearer k"})
            assert r.status_code == 200
    finally:
        await server.stop()


async def test_client_disconnect_frees_the_slot() -> None:
    server = await _server(itl_ms=50, output_tokens=100)
    try:
        async with (
            httpx.AsyncClient() as c,
            c.stream(
                "POST",
                f"{server.url}/v1/completions",
                json={"model": MODEL, "prompt": "x", "stream": True},
            ) as r,
        ):
            async for _ in r.aiter_lines():
                break
        for _ in range(250):
            if server.running == 0:
                break
            await asyncio.sleep(0.02)
        assert server.running == 0
    finally:
        await server.stop()


def test_command_line_flags() -> None:
    cfg, host, port = config_from_args(
        ["--port", "9001", "--model", "x", "--ttft-ms", "5", "--itl-ms", "2", "--jitter", "0.1",
         "--max-running", "8", "--output-tokens", "7", "--error-rate", "0.5",
         "--error-status", "503", "--stall-ms", "10", "--drop-after", "3",
         "--lora-modules", "a=/p/a"]
    )  # fmt: skip
    assert (host, port) == ("127.0.0.1", 9001)
    assert (cfg.model, cfg.ttft_ms, cfg.itl_ms, cfg.max_running) == ("x", 5, 2, 8)
    assert (cfg.error_rate, cfg.error_status, cfg.drop_after) == (0.5, 503, 3)
    assert cfg.lora_modules == {"a": "/p/a"}
    with pytest.raises(SystemExit):
        config_from_args(["--error-rate", "2"])


def test_it_continues_its_own_text_like_a_greedy_model() -> None:
    s = SimState()
    w = len(s.config.words)
    for k in (1, 3, w - 1, w, w + 2, 2 * w, 2 * w + 5):
        assert s.continued_from("Say:" + s.text(0, k)) == k
    assert s.continued_from("hello there") == 0
    assert s.continued_from(s.text(0, 3) + "x") == 0
    # A fresh answer starts at the beginning; a continued one where the prompt stopped.
    fresh = parse_gen(s, False, orjson.dumps({"prompt": "hi", "max_tokens": 2}))
    cont = parse_gen(s, False, orjson.dumps({"prompt": "hi" + s.text(0, 3)}))
    assert (fresh.start, cont.start, cont.n_out) == (0, 3, s.config.output_tokens - 3)
    chat = parse_gen(
        s,
        True,
        orjson.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": s.text(0, 4)},
                ],
                "continue_final_message": True,
            }
        ),
    )
    assert chat.start == 4


@pytest.mark.parametrize("itl_ms", [0.0, 1.0])  # the zero-latency writer and the clocked one
async def test_tokens_per_chunk_puts_several_tokens_in_one_delta(itl_ms: float) -> None:
    server = await _server(tokens_per_chunk=2, output_tokens=5, itl_ms=itl_ms)
    try:
        async with _client(server) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
        deltas = [c.choices[0].delta.content for c in chunks if c.choices]
        # The role chunk, then 2 + 2 + 1 tokens; the last delta carries the finish reason.
        assert deltas == ["", " the quick", " brown fox", " jumps"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    finally:
        await server.stop()


# ------------------------------------------------------------- /tokenize and /detokenize

PROMPTS: list[dict[str, object]] = [
    {"prompt": "Count   these five\nwords please"},
    {"prompt": ""},  # no word: still one token, as the usage counts it
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two parts"},
                    {"type": "text", "text": "and three more"},
                ],
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "last one"},
        ]
    },
    {"messages": [{"role": "user", "content": ""}]},
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["words", "empty", "chat", "empty-chat"])
async def test_tokenize_counts_what_the_usage_bills(
    sim: SimServer, prompt: dict[str, object]
) -> None:
    """vLLM's /tokenize shape, its count equal to the prompt tokens the same prompt is
    billed, and /detokenize giving the words back."""
    async with httpx.AsyncClient(base_url=sim.url) as c, _client(sim) as client:
        r = await c.post("/tokenize", json={"model": MODEL, **prompt, "return_token_strs": True})
        assert r.status_code == 200, r.text
        tok = r.json()
        if "messages" in prompt:
            done = await client.chat.completions.create(
                model=MODEL,
                messages=prompt["messages"],  # type: ignore[arg-type]
                max_tokens=1,
            )
        else:
            done = await client.completions.create(
                model=MODEL,
                prompt=prompt["prompt"],  # type: ignore[arg-type]
                max_tokens=1,
            )
        assert done.usage is not None
        assert set(tok) == {"count", "max_model_len", "tokens", "token_strs"}
        assert tok["count"] == len(tok["tokens"]) == done.usage.prompt_tokens
        assert tok["max_model_len"] == 2048
        assert len(tok["token_strs"]) == tok["count"]
        # Without return_token_strs: null, as vLLM answers; the same ids again.
        again = (await c.post("/tokenize", json=prompt)).json()
        assert again["token_strs"] is None and again["tokens"] == tok["tokens"]
        back = await c.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]})
        assert back.status_code == 200
        assert back.json() == {"prompt": " ".join(w for w in tok["token_strs"] if w)}


async def test_tokenize_chat_flags_ids_and_errors(sim: SimServer) -> None:
    chat = [{"role": "user", "content": "the quick brown fox"}]
    async with httpx.AsyncClient(base_url=sim.url) as c:
        plain = (await c.post("/tokenize", json={"messages": chat})).json()
        flagged = await c.post(
            "/tokenize",
            json={
                "messages": chat,
                "add_generation_prompt": False,
                "add_special_tokens": True,
                "continue_final_message": True,
            },
        )
        # The simulator's chat template and tokenizer add nothing: the flags change nothing.
        assert flagged.json() == plain and plain["count"] == 4
        # A word's id is stable (its CRC-32): the same word, the same id, wherever it is.
        words = (await c.post("/tokenize", json={"prompt": "fox the fox"})).json()["tokens"]
        assert words == [plain["tokens"][3], plain["tokens"][0], plain["tokens"][3]]
        # The output words detokenize without having been tokenized here.
        other = await _server()
        try:
            async with httpx.AsyncClient(base_url=other.url) as o:
                back = await o.post("/detokenize", json={"tokens": words})
                assert back.json() == {"prompt": "fox the fox"}
                unseen = (await c.post("/tokenize", json={"prompt": "zebra"})).json()["tokens"]
                refused = await o.post("/detokenize", json={"tokens": unseen})
                assert refused.status_code == 400
                assert f"Token id {unseen[0]} is out of vocabulary" in refused.text
        finally:
            await other.stop()

        errors = [
            (await c.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404),
            (await c.post("/tokenize", json={"model": MODEL}), 400),
            (await c.post("/tokenize", json={"prompt": ["x"]}), 400),
            (await c.post("/tokenize", json={"messages": []}), 400),
            (
                await c.post(
                    "/tokenize",
                    json={
                        "messages": chat,
                        "add_generation_prompt": True,
                        "continue_final_message": True,
                    },
                ),
                400,
            ),
            (await c.post("/detokenize", json={"tokens": [-1]}), 400),
            (await c.post("/detokenize", json={"tokens": "1 2"}), 400),
            (await c.get("/tokenize"), 405),
        ]
        for r, status in errors:
            assert r.status_code == status, (r.request.url, r.text)
            assert r.json()["error"]["code"] == status
        assert "Cannot set both" in errors[4][0].text


def test_vocab_is_bounded_and_counted_words_match_the_usage() -> None:
    from simulator.tokens import Vocab, counted_words, word_id
    from simulator.wire import count_words

    vocab = Vocab(["the"], capacity=2)
    ids = vocab.ids(["a", "b", "the", "c"])  # "a" falls out; "the" is kept for good
    assert ids == [word_id(w) for w in ("a", "b", "the", "c")]
    assert [vocab.word(i) for i in ids] == [None, "b", "the", "c"]
    assert vocab.ids([]) == [0] and vocab.word(0) == ""
    shapes: list[object] = [
        "a  b\tc",
        "",
        [1, 2, 3],
        [],
        {"content": "x y", "text": "z", "role": "user"},
        [{"role": "user", "content": [{"type": "text", "text": "p q"}, {"type": "image_url"}]}],
        [{"content": [5, 6]}, None, 7, "w"],
    ]
    for shape in shapes:
        assert len(counted_words(shape)) == count_words(shape), shape
