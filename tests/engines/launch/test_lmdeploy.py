"""The LMDeploy engine without a GPU: exact command lines for quantized, speculative, LoRA
and batching entries on both backends, each flag checked against its meaning in LMDeploy
0.18.0 (lmdeploy/cli/serve.py, lmdeploy/cli/utils.py, lmdeploy/messages.py); refusals with
their key paths; and, attached to a stand-in server that answers in LMDeploy 0.18's own
shapes (lmdeploy/serve/openai/protocol.py, errors.py), clean OpenAI responses, normalised
errors, `lmdeploy:*` metrics and the adapter refusal. Launch mode runs the simulator as a
stand-in `lmdeploy` program.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from engines.base import (
    AdapterError,
    EngineContext,
    EngineUnavailable,
    GenerateRequest,
    InvalidRequest,
)
from engines.launch.lmdeploy import LMDeployEngine, resolve_backend
from engines.spec import ModelSpec
from engines.upstream.errors import UpstreamModelNotFound

REPO = Path(__file__).resolve().parents[3]


def spec(**kw: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": "smol", "engine": "lmdeploy", "model": "/m/smol", **kw}
    )


def argv_of(s: ModelSpec) -> list[str]:
    return LMDeployEngine.launch_commands(s)[0]


def issues(s: ModelSpec) -> dict[str, str]:
    return {i.path: i.message for i in LMDeployEngine.check_spec(s)}


def head(backend: str) -> list[str]:
    return [
        "lmdeploy", "serve", "api_server", "/m/smol",   # positional model_path
        "--server-name", "127.0.0.1",                   # bind address: loopback only
        "--server-port", "8100",                        # options.base_port (8100) + i
        "--model-name", "smol",                         # the name /v1/models lists
        "--backend", backend,                           # turbomind | pytorch
        "--session-len", "2048",                        # max tokens of one sequence
    ]  # fmt: skip


def fp8_checkpoint(tmp: Path) -> Path:
    d = tmp / "fp8"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
        )
    )
    return d


# --------------------------------------------------------------------------- command lines


def test_plain_model_on_turbomind() -> None:
    s = spec()
    assert resolve_backend(s) == "turbomind"  # LMDeploy's own default
    assert LMDeployEngine.check_spec(s) == []
    assert argv_of(s) == head("turbomind")
    (cmd,) = LMDeployEngine.worker_commands(s)
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0"} and cmd.url == "http://127.0.0.1:8100"


@pytest.mark.parametrize("quant", ["awq", "gptq"])
def test_int4_on_turbomind(quant: str) -> None:
    s = spec(quantization=quant)
    assert LMDeployEngine.check_spec(s) == []
    # --model-format: TurboMind's weight layout; awq/gptq are 4-bit grouped checkpoints.
    assert argv_of(s) == [*head("turbomind"), "--model-format", quant]


def test_awq_on_pytorch_reads_the_checkpoint() -> None:
    s = spec(quantization="awq", options={"backend": "pytorch"})
    assert LMDeployEngine.check_spec(s) == []
    # The PyTorch engine finds AWQ in the checkpoint's quantization_config; its
    # --model-format means "quantize online", which exists for fp8 only.
    assert argv_of(s) == head("pytorch")


def test_fp8_defaults_to_pytorch_online_quantization() -> None:
    s = spec(quantization="fp8")
    assert resolve_backend(s) == "pytorch"
    assert LMDeployEngine.check_spec(s) == []
    # PyTorch + --model-format fp8: blocked FP8 weights made at load (sm ≥ 90).
    assert argv_of(s) == [*head("pytorch"), "--model-format", "fp8"]


def test_fp8_checkpoint_on_turbomind(tmp_path: Path) -> None:
    ckpt = fp8_checkpoint(tmp_path)
    s = spec(model=str(ckpt), quantization="fp8", options={"backend": "turbomind"})
    assert LMDeployEngine.check_spec(s) == []
    argv = argv_of(s)
    # TurboMind takes the method from the checkpoint's quantization_config (and asserts a
    # given --model-format equals it): the flag is left out.
    assert argv[3] == str(ckpt) and "--model-format" not in argv


def test_adapters_speculation_batching_and_gpus() -> None:
    s = spec(
        replicas=2,
        gpus_per_replica=2,
        dtype="bfloat16",
        batching={"max_sequences": 64, "max_batched_tokens": 4096},
        lora={"adapters": [{"name": "sql", "path": "/a/sql"}, {"name": "eq", "path": "/a/x=y"}]},
        speculative={"method": "eagle3", "model": "/m/eagle3", "num_speculative_tokens": 3},
        options={"cache_max_entry_count": 0.3, "base_port": 9100},
        engine_args={"eager-mode": True, "enable_prefix_caching": False, "log-level": "INFO"},
    )
    assert resolve_backend(s) == "pytorch"  # adapters and speculation need it
    assert LMDeployEngine.check_spec(s) == []
    cmds = LMDeployEngine.worker_commands(s)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in cmds] == ["0,1", "2,3"]
    assert [c.port for c in cmds] == [9100, 9101]
    h = head("pytorch")
    h[h.index("8100")] = "9100"
    assert cmds[0].argv == [
        *h,
        "--dtype", "bfloat16",                  # weights/activations (auto, float16, bfloat16)
        "--tp", "2",                            # tensor parallelism over the replica's GPUs
        "--max-batch-size", "64",               # sequences in one batch
        "--max-prefill-token-num", "4096",      # tokens per prefill iteration
        "--cache-max-entry-count", "0.3",       # share of free GPU memory for the k/v cache
        # One --adapters (nargs='*'), name=path each, split on the first "=".
        "--adapters", "sql=/a/sql", "eq=/a/x=y",
        "--speculative-algorithm", "eagle3",    # 0.18's spec-decode methods (eagle, eagle3, …)
        "--speculative-draft-model", "/m/eagle3",
        "--speculative-num-draft-tokens", "3",  # draft tokens proposed per step
        "--eager-mode",                         # engine_args: true → bare flag
        # enable_prefix_caching: false → omitted (store_true flags have no --no- form)
        "--log-level", "INFO",
    ]  # fmt: skip


# --------------------------------------------------------------------------- refusals


def test_refusals_name_their_key_paths(tmp_path: Path) -> None:
    # TurboMind: no adapters, no speculation, FP8 only from an FP8 checkpoint.
    got = issues(
        spec(
            quantization="fp8",
            options={"backend": "turbomind"},
            lora={"adapters": [{"name": "a", "path": "/a"}]},
            speculative={"method": "eagle", "model": "/h", "num_speculative_tokens": 2},
        )
    )
    assert "PyTorch backend" in got["lora"] and "ignores --adapters" in got["lora"]
    assert "PyTorch backend" in got["speculative"]
    assert "pre-quantized blocked-FP8 checkpoint" in got["options.backend"]

    # Runtime adapter loading does not exist in LMDeploy 0.18.
    got = issues(spec(lora={"roots": [str(tmp_path)]}))
    assert "cannot load adapters at runtime" in got["lora.roots"]

    # ngram and draft-model speculation are not among --speculative-algorithm's choices.
    for method, extra in (("ngram", {}), ("draft", {"model": "/d"})):
        got = issues(spec(speculative={"method": method, "num_speculative_tokens": 2, **extra}))
        assert f"no {method} speculative decoding" in got["speculative.method"]

    # GPTQ: TurboMind only; with LoRA the backend must be PyTorch: a conflict.
    got = issues(spec(quantization="gptq", lora={"adapters": [{"name": "a", "path": "/a"}]}))
    assert "GPTQ runs on TurboMind only" in got["quantization"]
    got = issues(spec(quantization="gptq", options={"backend": "pytorch"}))
    assert "GPTQ runs on TurboMind only" in got["options.backend"]

    got = issues(spec(dtype="float32"))
    assert got == {"dtype": "LMDeploy accepts auto, float16 or bfloat16"}
    got = issues(spec(task="embed", max_tokens_default=16))
    assert "no embeddings" in got["task"]
    got = issues(spec(gpus_per_replica=0))
    assert "GPUs only" in got["gpus_per_replica"]
    got = issues(spec(quantization="fp8", options={"cache_max_entry_count": 2}))
    assert "0 < value < 1" in got["options.cache_max_entry_count"]
    got = issues(spec(options={"backend": "vllm"}))
    assert "options.backend" in got
    got = issues(spec(engine_args={"server-port": 1, "tp": 2}))
    assert "options.base_port" in got["engine_args.server-port"]
    assert "gpus_per_replica" in got["engine_args.tp"]
    got = issues(
        spec(speculative={"method": "eagle", "model": "/h", "num_speculative_tokens": 2,
                          "draft_tensor_parallel_size": 1})
    )  # fmt: skip
    assert "speculative.draft_tensor_parallel_size" in got

    # An unquantized local checkpoint cannot be served as AWQ.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    got = issues(spec(model=str(plain), quantization="awq"))
    assert "is not AWQ-quantized" in got["quantization"]


# --------------------------------------------------------------------------- attached


def chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    # As LMDeploy 0.18 streams it: every delta repeats the role (exclude_none dump).
    delta: dict[str, Any] = {"role": "assistant"}
    if content is not None:
        delta["content"] = content
    choice: dict[str, Any] = {"index": 0, "delta": delta}
    if finish:
        choice["finish_reason"] = finish
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "smol", "choices": [choice], "usage": None}  # fmt: skip


WHOLE = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "smol",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Paris.", "reasoning_content": None,
                    "tool_calls": None},
        "logprobs": None, "output_token_logprobs": None, "finish_reason": "stop",
        "output_ids": None, "routed_experts": None,
    }],
    "usage": {"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2},
    "service_tier": None,
}  # fmt: skip


def lm_error(status: int, message: str, etype: str) -> dict[str, Any]:
    # lmdeploy/serve/openai/errors.py create_error_response: a flat ErrorResponse.
    return {"message": message, "type": etype, "code": status, "param": None, "object": "error"}


class FakeLMDeploy:
    """Answers like `lmdeploy serve api_server` 0.18: shapes from its protocol.py and
    errors.py. The prompt text picks the behaviour."""

    def __init__(self) -> None:
        self.runtime_adapter_calls = 0
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/load_lora_adapter", self.lora)
        app.router.add_post("/v1/unload_lora_adapter", self.lora)
        self.runner = web.AppRunner(app, access_log=None)
        self.url = ""

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def health(self, _r: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def metrics(self, _r: web.Request) -> web.Response:
        text = (
            "# TYPE lmdeploy:num_requests_running gauge\n"
            'lmdeploy:num_requests_running{model_name="smol"} 2.0\n'
            'lmdeploy:num_requests_waiting{model_name="smol"} 1.0\n'
            'lmdeploy:num_api_requests_waiting{model_name="smol"} 3.0\n'
            'lmdeploy:gpu_cache_usage_perc{model_name="smol"} 0.25\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def lora(self, _r: web.Request) -> web.Response:
        self.runtime_adapter_calls += 1
        return web.json_response({"detail": "Not Found"}, status=404)

    async def chat(self, r: web.Request) -> web.StreamResponse:
        body = await r.json()
        prompt = body["messages"][-1]["content"]
        if body["model"] != "smol":
            err = lm_error(404, f"The model {body['model']!r} does not exist.", "not_found_error")
            return web.json_response(err, status=404)
        if prompt == "too long":
            msg = "Input length (3000) must be smaller than the model context length (2048)."
            return web.json_response(lm_error(400, msg, "invalid_request_error"), status=400)
        if not body.get("stream"):
            return web.json_response(WHOLE)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(r)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        await send(chunk("Par"))
        if prompt == "fail mid-stream":
            # serving.py: a RequestError after the first chunk becomes an error event.
            await send({"error": lm_error(503, "The inference engine is unavailable.",
                                          "server_error")})  # fmt: skip
        else:
            await send(chunk("is"))
            await send(chunk(".", finish="stop"))
            await send({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                        "model": "smol", "choices": [],
                        "usage": {"prompt_tokens": 5, "total_tokens": 8,
                                  "completion_tokens": 3}})  # fmt: skip
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def request(prompt: str, *, stream: bool, adapter: str | None = None) -> GenerateRequest:
    body: dict[str, Any] = {
        "model": adapter or "smol",
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return GenerateRequest(route="chat", body=body, model=adapter or "smol", adapter=adapter,
                           request_id="r1", created=int(time.time()))  # fmt: skip


async def events(it: AsyncIterator[bytes]) -> list[dict[str, Any]]:
    out = []
    async for run in it:
        out += [orjson.loads(e[6:]) for e in run.split(b"\n\n") if e.startswith(b"data: ")]
    return out


@pytest.fixture
async def attached() -> AsyncIterator[tuple[LMDeployEngine, FakeLMDeploy]]:
    upstream = FakeLMDeploy()
    url = await upstream.start()
    s = spec(
        model=None,
        endpoints=[url],
        lora={"adapters": [{"name": "sql", "path": "/a/sql"}]},
        options={"backend": "pytorch"},
    )
    assert LMDeployEngine.check_spec(s) == []
    engine = LMDeployEngine(s)
    await engine.start()
    yield engine, upstream
    await engine.stop()
    await upstream.runner.cleanup()


async def test_whole_response_is_clean_openai(
    attached: tuple[LMDeployEngine, FakeLMDeploy],
) -> None:
    engine, _ = attached
    done = await engine.complete(request("hi", stream=False))
    body = orjson.loads(done.body)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Paris."}
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Paris."},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert done.usage is not None and done.usage.completion_tokens == 2


async def test_stream_keeps_role_only_in_the_first_delta(
    attached: tuple[LMDeployEngine, FakeLMDeploy],
) -> None:
    engine, _ = attached
    for _ in range(2):  # a second stream with the same id starts over
        evs = await events(engine.stream(request("hi", stream=True)))
        deltas = [e["choices"][0]["delta"] for e in evs if e["choices"]]
        assert deltas == [
            {"role": "assistant", "content": "Par"},
            {"content": "is"},
            {"content": "."},
        ]
        assert evs[-1]["usage"]["completion_tokens"] == 3


async def test_errors_are_normalised(attached: tuple[LMDeployEngine, FakeLMDeploy]) -> None:
    engine, _ = attached
    with pytest.raises(UpstreamModelNotFound) as nf:
        await engine.complete(request("hi", stream=False, adapter="nope"))
    assert nf.value.status == 404 and "does not exist" in nf.value.message

    with pytest.raises(InvalidRequest) as ctx:
        await engine.complete(request("too long", stream=False))
    assert ctx.value.status == 400 and ctx.value.code == "context_length_exceeded"

    got: list[dict[str, Any]] = []
    with pytest.raises(EngineUnavailable) as mid:
        async for run in engine.stream(request("fail mid-stream", stream=True)):
            got.append(orjson.loads(run.split(b"\n\n")[0][6:]))
    assert len(got) == 1  # the first chunk went out, then the error
    assert mid.value.status == 503 and "unavailable" in mid.value.message


async def test_metrics_and_adapter_policy(attached: tuple[LMDeployEngine, FakeLMDeploy]) -> None:
    engine, upstream = attached
    st = engine.status()
    (w,) = st.workers
    assert w.healthy and w.running == 2
    assert w.waiting == 1 + 3  # scheduler queue + API server queue
    assert w.kv_cache_usage == 0.25
    # Start adapters are listed; runtime load/unload is refused and never reaches the worker.
    assert engine.adapters() == ["sql"]
    with pytest.raises(AdapterError, match="only at start"):
        await engine.load_adapter("new", "/a/new")
    with pytest.raises(AdapterError, match="cannot unload"):
        await engine.unload_adapter("sql")
    assert upstream.runtime_adapter_calls == 0
    assert engine.adapters() == ["sql"]


# --------------------------------------------------------------------------- launched

# Plays `lmdeploy`: checks the subcommand, then serves the simulator on --server-port.
FAKE_LMDEPLOY = r"""
import sys
args = sys.argv[1:]
assert args[:2] == ["serve", "api_server"], args
def value(flag):
    return args[args.index(flag) + 1]
print("fake lmdeploy:", " ".join(args), flush=True)
from simulator.__main__ import serve_main
sys.exit(serve_main(["--host", value("--server-name"), "--port", value("--server-port"),
                     "--model", value("--model-name")]))
"""


async def test_launch_mode_with_a_stand_in_lmdeploy(tmp_path: Path) -> None:
    program = tmp_path / "fake_lmdeploy.py"
    program.write_text(FAKE_LMDEPLOY)
    (tmp_path / "ckpt").mkdir()
    s = spec(
        model="ckpt",
        options={
            "backend": "pytorch",
            "command": [sys.executable, str(program)],
            "env": {"PYTHONPATH": str(REPO)},
        },
    )
    lines: list[str] = []
    engine = LMDeployEngine(s, EngineContext(tmp_path / "cache", tmp_path, lines.append))
    await engine.start()
    try:
        sup = engine.supervisor
        assert sup is not None
        log = (tmp_path / "cache" / "logs" / "smol" / "lmdeploy_0_.log").read_text()
        assert f"api_server {tmp_path / 'ckpt'} --server-name 127.0.0.1" in log
        done = await engine.complete(request("hi", stream=False))
        assert orjson.loads(done.body)["choices"][0]["message"]["content"]
        assert any(ln.startswith("lmdeploy[0] healthy at ") for ln in lines)
    finally:
        await engine.stop()
    await asyncio.sleep(0)


def test_two_replicas_share_one_gpu_with_a_cache_share_each() -> None:
    s = spec(replicas=2, options={"gpu_ids": [0, 0]})
    assert LMDeployEngine.check_spec(s) == []
    cmds = LMDeployEngine.worker_commands(s)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in cmds] == ["0", "0"]
    for c in cmds:
        assert c.argv[c.argv.index("--cache-max-entry-count") + 1] == "0.45"
    own = spec(replicas=2, options={"gpu_ids": [0, 0], "cache_max_entry_count": 0.3})
    argv = LMDeployEngine.launch_commands(own)[0]
    assert argv[argv.index("--cache-max-entry-count") + 1] == "0.3"
