"""The vLLM engine without a GPU: exact command lines and environments for quantized,
speculative, LoRA and batching entries, each flag checked against its meaning in vLLM 0.26.0
(vllm/engine/arg_utils.py, vllm/config/*.py, vllm/entrypoints/openai/cli_args.py);
refusals with their key paths; attach mode against two in-process simulator workers
(through the engine, and through the gateway with the `openai` SDK); launch mode with the
simulator standing in for the `vllm` program (crash → restart → runtime adapter back).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from engines.base import EngineContext, GenerateRequest
from engines.launch.command import free_port
from engines.launch.vllm import VLLMEngine
from engines.spec import ModelSpec
from simulator import SimServer

REPO = Path(__file__).resolve().parents[3]


def spec(**kw: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "smol", "engine": "vllm", "model": "/m/smol", **kw})


def argv_of(s: ModelSpec, replica: int = 0) -> list[str]:
    return VLLMEngine.launch_commands(s)[replica]


def issues(s: ModelSpec) -> dict[str, str]:
    return {i.path: i.message for i in VLLMEngine.check_spec(s)}


HEAD = [
    "vllm", "serve", "/m/smol",               # positional model (path or hub id)
    "--served-model-name", "smol",            # the name clients send as `model`
    "--host", "127.0.0.1", "--port", "8100",  # loopback only; options.base_port (8100) + i
    "--max-model-len", "2048",                # context length (prompt + output)
    "--shutdown-timeout", "30",               # on SIGTERM, finish requests (options.stop_grace_s)
]  # fmt: skip


# --------------------------------------------------------------------------- command lines


def test_plain_model_passes_only_what_models_yaml_says() -> None:
    s = spec()
    assert VLLMEngine.check_spec(s) == []
    assert argv_of(s) == HEAD
    # No --max-num-seqs: the schema's default of 16 is the embedded engine's; vLLM sizes
    # its own default to the GPU. GPU 0 only; no LoRA env.
    (cmd,) = VLLMEngine.worker_commands(s)
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert cmd.url == "http://127.0.0.1:8100"


@pytest.mark.parametrize("quant", ["awq", "gptq", "fp8"])
def test_quantization(quant: str) -> None:
    s = spec(quantization=quant)
    assert VLLMEngine.check_spec(s) == []
    # --quantization/-q: "Method used to quantize the weights". awq/gptq name the
    # checkpoint's format (vLLM resolves both to auto_awq/auto_gptq and picks the Marlin
    # kernel itself on Hopper); fp8 also quantizes an unquantized checkpoint online.
    assert argv_of(s) == [*HEAD, "--quantization", quant]


def test_ngram_speculation() -> None:
    s = spec(speculative={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    argv = argv_of(s)
    assert argv[: len(HEAD)] == HEAD and argv[len(HEAD)] == "--speculative-config"
    # One JSON object with SpeculativeConfig's field names: method "ngram", k proposed
    # tokens per step, the longest prompt n-gram to look up (vLLM copies it to the
    # missing prompt_lookup_min).
    assert json.loads(argv[len(HEAD) + 1]) == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
    }
    assert len(argv) == len(HEAD) + 2


def test_draft_model_speculation() -> None:
    s = spec(
        speculative={"method": "draft", "model": "/m/draft", "num_speculative_tokens": 3},
    )
    argv = argv_of(s)
    # method "draft_model" is 0.26's name for a separate small draft model.
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {
        "method": "draft_model",
        "model": "/m/draft",
        "num_speculative_tokens": 3,
    }


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_speculation(method: str) -> None:
    s = spec(
        gpus_per_replica=2,
        speculative={
            "method": method,
            "model": "/m/head",
            "num_speculative_tokens": 2,
            "draft_tensor_parallel_size": 2,
        },
    )
    assert VLLMEngine.check_spec(s) == []
    argv = argv_of(s)
    # The EAGLE head is `model`; its tensor parallelism may be 1 or the target's.
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {
        "method": method,
        "model": "/m/head",
        "num_speculative_tokens": 2,
        "draft_tensor_parallel_size": 2,
    }
    # --tensor-parallel-size: each replica splits the model over its 2 GPUs.
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_lora_flags_and_runtime_updates() -> None:
    s = spec(
        lora={
            "max_adapters": 3,
            "max_rank": 32,
            "adapters": [
                {"name": "sql", "path": "/a/sql"},
                {"name": "odd", "path": "/a/x=1,2"},
            ],
        }
    )
    assert VLLMEngine.check_spec(s) == []
    assert argv_of(s) == [
        *HEAD,
        "--enable-lora",                 # serve LoRA adapters at all
        "--max-loras", "3",              # adapters in one batch (and GPU slots)
        "--max-lora-rank", "32",         # largest rank any adapter may have
        # One --lora-modules with every adapter (a repeated flag keeps only the last);
        # name=path, or the JSON form for a path that "name=path" splitting would break.
        "--lora-modules", "sql=/a/sql", '{"name":"odd","path":"/a/x=1,2"}',
    ]  # fmt: skip
    (cmd,) = VLLMEngine.worker_commands(s)
    # Without this, vLLM 0.26 has no /v1/load_lora_adapter route (vllm/envs.py).
    assert cmd.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_batching_dtype_and_engine_args() -> None:
    s = spec(
        dtype="bfloat16",
        batching={"max_sequences": 128, "max_batched_tokens": 8192},
        engine_args={
            "gpu_memory_utilization": 0.4,
            "enforce-eager": True,
            "enable-prefix-caching": False,
            "cuda-graph-sizes": [1, 2, 4],
            "hf-overrides": {"rope_theta": 1e6},
            "ignored": None,
        },
    )
    assert VLLMEngine.check_spec(s) == []
    assert argv_of(s) == [
        *HEAD,
        "--dtype", "bfloat16",                   # weights and activations dtype
        "--max-num-seqs", "128",                 # sequences in one scheduler iteration
        "--max-num-batched-tokens", "8192",      # tokens in one scheduler iteration
        "--gpu-memory-utilization", "0.4",       # engine_args: `_` → `-`, value as text
        "--enforce-eager",                       # true → bare flag
        "--no-enable-prefix-caching",            # false → vLLM's BooleanOptionalAction --no-
        "--cuda-graph-sizes", "1", "2", "4",     # list → one flag, nargs='+'
        "--hf-overrides", '{"rope_theta":1000000.0}',  # dict → one JSON argument
    ]  # fmt: skip


def test_replicas_get_their_own_gpus_and_ports() -> None:
    s = spec(
        replicas=2,
        gpus_per_replica=2,
        options={"base_port": 9000, "gpu_ids": [4, 5, 6, 7], "env": {"HF_HUB_OFFLINE": "1"}},
    )
    assert VLLMEngine.check_spec(s) == []
    cmds = VLLMEngine.worker_commands(s)
    assert [c.port for c in cmds] == [9000, 9001]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in cmds] == ["4,5", "6,7"]
    assert all(c.env["HF_HUB_OFFLINE"] == "1" for c in cmds)
    assert [c.label for c in cmds] == ["vllm[0]", "vllm[1]"]
    assert cmds[1].argv[cmds[1].argv.index("--port") + 1] == "9001"


def test_launch_commands_are_deterministic_and_custom_program() -> None:
    s = spec(options={"command": ["/opt/venv/bin/python", "-m", "vllm.entrypoints.cli.main"]})
    assert argv_of(s)[:5] == [
        "/opt/venv/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", "/m/smol",
    ]  # fmt: skip
    assert VLLMEngine.launch_commands(s) == VLLMEngine.launch_commands(s)


def test_embedding_model_runs_the_pooling_runner() -> None:
    s = spec(task="embed", max_tokens_default=16)
    # --runner pooling: the model serves /v1/embeddings, not generation.
    assert argv_of(s) == [*HEAD, "--runner", "pooling"]


def test_attach_mode_launches_nothing() -> None:
    s = spec(endpoints=["http://10.0.0.1:8000", "http://10.0.0.2:8000/v1"])
    assert VLLMEngine.check_spec(s) == []
    assert VLLMEngine.launch_commands(s) == []


# --------------------------------------------------------------------------- refusals


def test_refusals_name_their_key_paths() -> None:
    got = issues(spec(lora={"max_rank": 48}))
    assert "1, 8, 16, 32, 64, 128, 256, 320, 512" in got["lora.max_rank"]
    assert "use 64" in got["lora.max_rank"]

    got = issues(spec(model="/m/smol.Q4_1.gguf", quantization="awq"))
    assert "GGUF" in got["quantization"] and "none or fp8" in got["quantization"]
    assert issues(spec(model="/m/smol.Q4_1.gguf", quantization="fp8")) == {}

    got = issues(
        spec(
            gpus_per_replica=4,
            speculative={
                "method": "eagle",
                "model": "/h",
                "num_speculative_tokens": 2,
                "draft_tensor_parallel_size": 2,
            },
        )
    )
    assert (
        "1 or the target's tensor parallel size (4)"
        in got["speculative.draft_tensor_parallel_size"]
    )

    got = issues(spec(options={"base_prot": 9000, "start_timeout_s": -1}))
    assert got["options.base_prot"].startswith("unknown option; known: ")
    assert "base_port" in got["options.base_prot"]
    assert "options.start_timeout_s" in got

    got = issues(spec(engine_args={"port": 1, "quantization": "awq", "max_num_seqs": 8}))
    assert got["engine_args.port"] == "set by the gateway from options.base_port; use that"
    assert "from quantization" in got["engine_args.quantization"]
    assert "batching.max_sequences" in got["engine_args.max_num_seqs"]

    # vLLM 0.26 would start, build its config and then refuse runtime LoRA updates with
    # two API servers: refused here, before anything starts.
    got = issues(spec(lora={"max_rank": 8}, engine_args={"api_server_count": 2}))
    assert "more than one API server" in got["engine_args.api-server-count"]
    got = issues(spec(lora={"max_rank": 8}, engine_args={"--api-server-count": "4"}))
    assert "remove `lora` or use 1" in got["engine_args.api-server-count"]
    assert issues(spec(lora={"max_rank": 8}, engine_args={"api-server-count": 1})) == {}
    assert issues(spec(engine_args={"api-server-count": 2})) == {}
    got = issues(ModelSpec.model_validate({"name": "x", "engine": "vllm"}))
    assert got == {"model": "required to launch vllm"}

    got = issues(spec(endpoints=["http://h:1"], options={"gpu_ids": [0]}))
    assert "only used when the gateway launches workers" in got["options.gpu_ids"]


def test_eagle_without_a_head_is_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="method eagle needs a draft model or head"):
        spec(speculative={"method": "eagle", "num_speculative_tokens": 2})


def test_quantization_must_match_a_local_checkpoint(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    )
    # vLLM cannot make AWQ weights out of an unquantized checkpoint...
    got = issues(spec(model=str(plain), quantization="awq"))
    assert "is not AWQ-quantized" in got["quantization"]
    # ...but quantizes to FP8 online.
    assert issues(spec(model=str(plain), quantization="fp8")) == {}
    # A GPTQ checkpoint is GPTQ: vllm/config/model.py refuses a mismatch at start.
    assert (
        "quantized with 'gptq', not 'awq'"
        in issues(spec(model=str(gptq), quantization="awq"))["quantization"]
    )
    assert issues(spec(model=str(gptq), quantization="gptq")) == {}


# --------------------------------------------------------------------------- attach mode


def request(stream: bool, *, model: str = "m", adapter: str | None = None) -> GenerateRequest:
    body: dict[str, Any] = {
        "model": adapter or model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return GenerateRequest(
        route="chat", body=body, model=adapter or model, adapter=adapter,
        request_id="req-1", created=int(time.time()),
    )  # fmt: skip


async def collect(it: AsyncIterator[bytes]) -> list[dict[str, Any]]:
    events = []
    async for run in it:
        for ev in run.split(b"\n\n"):
            if ev.startswith(b"data: "):
                events.append(orjson.loads(ev[6:]))
    return events


async def test_attach_relays_to_both_simulator_workers() -> None:
    workers = [SimServer(model="m", itl_ms=10), SimServer(model="m", itl_ms=10)]
    urls = [await w.start("127.0.0.1", 0) for w in workers]
    engine = VLLMEngine(
        spec(model=None, served_model_name="m", endpoints=urls, lora={"max_rank": 8})
    )
    await engine.start()
    try:

        async def one_of_each() -> None:
            done = await engine.complete(request(False))
            assert orjson.loads(done.body)["choices"][0]["message"]["content"]
            events = await collect(engine.stream(request(True)))
            assert events[-1]["usage"]["completion_tokens"] == 4

        # Concurrent requests: the relay's fewest-outstanding pick spreads them.
        await asyncio.gather(*(one_of_each() for _ in range(4)))
        assert all(w.requests_total > 0 for w in workers), [w.requests_total for w in workers]
        assert sum(w.requests_total for w in workers) == 8

        # Runtime LoRA (inherited): loaded on every worker, used, unloaded everywhere.
        await engine.load_adapter("sql", "/adapters/sql")
        assert all(w.adapters == {"sql": "/adapters/sql"} for w in workers)
        assert engine.adapters() == ["sql"]
        done = await engine.complete(request(False, adapter="sql"))
        assert orjson.loads(done.body)["model"] == "sql"
        await engine.unload_adapter("sql")
        assert all(w.adapters == {} for w in workers)
        st = engine.status()
        assert st.ready and [w.healthy for w in st.workers] == [True, True]
    finally:
        await engine.stop()
        for w in workers:
            await w.stop()


def test_attach_through_the_gateway_with_the_openai_sdk(tmp_path: Path) -> None:
    from tests.conftest import start_gateway
    from tests.gateway.test_api_sim import SimThread

    sims = SimThread()
    workers = [sims.start(model="smol-upstream", itl_ms=20) for _ in range(2)]
    gw = start_gateway(
        [
            {
                "name": "smol",
                "engine": "vllm",
                "served_model_name": "smol-upstream",
                "endpoints": [w.url for w in workers],
            }
        ],
        tmp_path,
    )
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)

        def one_of_each(_: int) -> None:
            r = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert r.model == "smol" and r.choices[0].message.content
            chunks = list(
                client.chat.completions.create(
                    model="smol",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=3,
                    stream=True,
                )
            )
            assert all(c.model == "smol" for c in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        # Concurrent clients, so the fewest-outstanding pick uses both workers.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one_of_each, range(4)))
        assert all(w.requests_total > 0 for w in workers)
    finally:
        client.close()
        gw.stop()
        for w in workers:
            sims.call(w.stop())
        sims.close()


# --------------------------------------------------------------------------- launch mode

# Plays `vllm`: records its argv and environment, then serves the simulator under the
# served model name with the --lora-modules it was given (as vLLM would).
FAKE_VLLM = r"""
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
assert args[0] == "serve", args
def value(flag):
    return args[args.index(flag) + 1]
port = value("--port")
Path(os.environ["FAKE_VLLM_RECORD"], port + ".json").write_text(
    json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))
mods = []
if "--lora-modules" in args:
    for a in args[args.index("--lora-modules") + 1:]:
        if a.startswith("--"):
            break
        mods.append(a)
from simulator.__main__ import serve_main
sys.exit(serve_main(["--host", value("--host"), "--port", port,
                     "--model", value("--served-model-name"), "--lora-modules", *mods]))
"""


async def test_launch_mode_with_a_stand_in_vllm(tmp_path: Path) -> None:
    program = tmp_path / "fake_vllm.py"
    program.write_text(FAKE_VLLM)
    record = tmp_path / "record"
    record.mkdir()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    s = ModelSpec.model_validate(
        {
            "name": "smol",
            "engine": "vllm",
            "model": "ckpt",  # relative: resolved against the directory of models.yaml
            "replicas": 2,
            "lora": {"max_rank": 8, "adapters": [{"name": "start", "path": "adapters/start"}]},
            "options": {
                "command": [sys.executable, str(program)],
                "env": {"FAKE_VLLM_RECORD": str(record), "PYTHONPATH": str(REPO)},
                "restart_backoff_s": 0.1,
                "health_interval_s": 0.2,
            },
        }
    )
    assert VLLMEngine.check_spec(s) == []
    lines: list[str] = []
    ctx = EngineContext(cache_dir=tmp_path / "cache", config_dir=tmp_path, progress=lines.append)
    engine = VLLMEngine(s, ctx)
    await engine.start()
    sup = engine.supervisor
    assert sup is not None
    try:
        urls = sup.urls
        ports = [u.rsplit(":", 1)[1] for u in urls]
        assert len(set(ports)) == 2 and "8100" not in ports  # free ports at a real launch
        # What each worker ran is exactly the documented command line, with the resolved
        # paths and its own port.
        for i, port in enumerate(ports):
            rec = json.loads((record / f"{port}.json").read_text())
            assert rec["argv"] == [
                "serve", str(ckpt), "--served-model-name", "smol",
                "--host", "127.0.0.1", "--port", port, "--max-model-len", "2048",
                "--shutdown-timeout", "30",
                "--enable-lora", "--max-loras", "4", "--max-lora-rank", "8",
                "--lora-modules", f"start={tmp_path / 'adapters/start'}",
            ]  # fmt: skip
            assert rec["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
            assert rec["env"]["CUDA_VISIBLE_DEVICES"] == str(i)
        assert any(ln.startswith("vllm[0]: CUDA_VISIBLE_DEVICES=0 ") for ln in lines)
        assert engine.adapters() == ["start"]

        done = await engine.complete(request(False, model="smol"))
        assert orjson.loads(done.body)["choices"][0]["message"]["content"]
        await engine.load_adapter("hot", "/adapters/hot")

        # Kill worker 1: it is restarted on the same URL and gets "hot" back (the start
        # adapter comes back from its command line).
        pid = sup.states()[1].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (sup.states()[1].restarts == 1 and sup.states()[1].healthy):
            assert time.monotonic() < deadline, lines
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(trust_env=False) as c:
            models = (await c.get(urls[1] + "/v1/models")).json()
        assert {m["id"] for m in models["data"]} >= {"smol", "start", "hot"}
        while not engine.status().workers[1].healthy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert "1 restart(s)" in engine.status().workers[1].detail
        for _ in range(4):
            assert (await engine.complete(request(False, model="smol"))).body
    finally:
        pids = [st.pid for st in sup.states()]
        await engine.stop()
    for p in pids:
        assert p is not None
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
    assert engine.supervisor is None


async def test_launch_failure_surfaces_the_worker_log(tmp_path: Path) -> None:
    program = tmp_path / "broken_vllm.py"
    program.write_text("import sys; print('ValueError: bad model config', flush=True); sys.exit(1)")
    (tmp_path / "ckpt").mkdir()
    s = spec(
        model=str(tmp_path / "ckpt"),
        options={"command": [sys.executable, str(program)], "base_port": free_port()},
    )
    engine = VLLMEngine(s, EngineContext(cache_dir=tmp_path, config_dir=tmp_path))
    with pytest.raises(Exception) as info:
        await engine.start()
    assert "vllm[0] exited with exit code 1" in str(info.value)
    assert "ValueError: bad model config" in str(info.value)


def test_two_replicas_share_one_gpu_with_a_memory_share_each() -> None:
    s = spec(replicas=2, options={"gpu_ids": [0, 0]})
    assert VLLMEngine.check_spec(s) == []
    cmds = VLLMEngine.worker_commands(s)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in cmds] == ["0", "0"]
    for c in cmds:  # 0.9 ÷ 2 replicas on GPU 0
        assert c.argv[c.argv.index("--gpu-memory-utilization") + 1] == "0.45"
    explicit = spec(replicas=2, options={"gpu_ids": [0, 0], "gpu_memory_share": 0.4})
    assert "0.4" in argv_of(explicit)
    too_much = spec(replicas=2, options={"gpu_ids": [0, 0], "gpu_memory_share": 0.6})
    assert "at most 0.47" in issues(too_much)["options.gpu_memory_share"]
    twice = spec(replicas=1, gpus_per_replica=2, options={"gpu_ids": [0, 0]})
    assert "twice" in issues(twice)["options.gpu_ids"]
    # engine_args win over the computed share.
    own = spec(replicas=2, options={"gpu_ids": [0, 0]}, engine_args={"gpu_memory_utilization": 0.3})
    assert argv_of(own).count("--gpu-memory-utilization") == 1
    # Not shared: vLLM's own default, no flag.
    assert "--gpu-memory-utilization" not in argv_of(spec(replicas=2))


def test_replicas_sharing_a_gpu_start_one_after_another() -> None:
    """Each vLLM sizes its KV cache from the memory free while it profiles: two starting
    together on one GPU made one find none on the H200 (docs/gpu.md), so they start in
    waves, unless the cache size is fixed."""
    waves = VLLMEngine.start_waves
    shared = spec(replicas=2, options={"gpu_ids": [0, 0]})
    assert waves(shared, VLLMEngine.launch_options(shared)) == [[0], [1]]
    four = spec(replicas=4, options={"gpu_ids": [0, 1, 0, 1]})
    assert waves(four, VLLMEngine.launch_options(four)) == [[0, 1], [2, 3]]
    own = spec(replicas=2, options={"gpu_ids": [0, 1]})
    assert waves(own, VLLMEngine.launch_options(own)) == [[0, 1]]
    fixed = spec(
        replicas=2, options={"gpu_ids": [0, 0]}, engine_args={"kv-cache-memory-bytes": 2**31}
    )
    assert waves(fixed, VLLMEngine.launch_options(fixed)) == [[0, 1]]


# A stand-in `vllm serve` for the drain: answers /health, records its argv, and on SIGTERM
# records the signal; mode "drain" then finishes (as vLLM with --shutdown-timeout does),
# mode "stubborn" ignores it (a wedged worker).
DRAIN_VLLM = r"""
import http.server, json, os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
record = Path(os.environ["FAKE_VLLM_RECORD"])
record.joinpath("argv.json").write_text(json.dumps(args))
def on_term(signum, frame):
    record.joinpath("signals").open("a").write("SIGTERM\n")
    if os.environ["FAKE_MODE"] == "drain":
        time.sleep(0.3)  # the running requests finish
        record.joinpath("signals").open("a").write("drained\n")
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.mark.parametrize("mode", ["drain", "stubborn"])
async def test_stop_gives_vllm_its_shutdown_timeout_then_kills(tmp_path: Path, mode: str) -> None:
    program = tmp_path / "drain_vllm.py"
    program.write_text(DRAIN_VLLM)
    s = ModelSpec.model_validate(
        {
            "name": "smol",
            "engine": "vllm",
            "model": "hub/smol",
            "options": {
                "command": [sys.executable, str(program)],
                "env": {"FAKE_VLLM_RECORD": str(tmp_path), "FAKE_MODE": mode},
                "stop_grace_s": 1.5,
                "stop_margin_s": 0.5,
            },
        }
    )
    lines: list[str] = []
    ctx = EngineContext(cache_dir=tmp_path / "cache", config_dir=tmp_path, progress=lines.append)
    engine = VLLMEngine(s, ctx)
    await engine.start()
    sup = engine.supervisor
    assert sup is not None
    pid = sup.states()[0].pid
    assert pid is not None
    argv = json.loads((tmp_path / "argv.json").read_text())
    # The stop grace, rounded up to vLLM's whole seconds.
    assert argv[argv.index("--shutdown-timeout") + 1] == "2"
    t0 = time.monotonic()
    await engine.stop()
    took = time.monotonic() - t0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    signals = (tmp_path / "signals").read_text().split()
    killed = [ln for ln in lines if "SIGKILL" in ln]
    if mode == "drain":
        assert signals == ["SIGTERM", "drained"] and killed == []
    else:
        # SIGTERM, then the grace plus the margin, then SIGKILL, with a line saying so.
        assert signals == ["SIGTERM"] and took >= 2.0
        assert killed == ["vllm[0]: still running 2 s after SIGTERM: SIGKILL"]
