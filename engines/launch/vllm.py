"""The vLLM engine: `vllm serve` worker processes built from a models.yaml entry, or
attached by URL.

Owns: the mapping of a `ModelSpec` to vLLM 0.26.0's command line and environment
(`worker_commands`, `launch_commands`), the refusals of what vLLM 0.26.0 cannot do
(`check_spec`). Launch, supervision, attach mode and re-applying runtime LoRA adapters to
a worker restarted after a crash come from `engines.launch.engine.LaunchedEngine`.

Does not own: relaying requests, streaming, error normalisation, runtime LoRA load/unload
and reading `vllm:*` metrics, all inherited from `engines.upstream.engine.OpenAIEngine` (vLLM
speaks that API natively); process supervision itself (`engines.launch.supervisor`). vllm is never
imported: the gateway runs its CLI, so the gateway starts without torch or CUDA.

Every fact about vLLM below was read in vLLM 0.26.0's own source (the wheel
vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl from PyPI); the file is named where used.

Why one module of this size: it is vLLM's flag mapping and refusals, one table of facts
about one program; the launch machinery shared with LMDeploy is `engines.launch.engine`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any, ClassVar

from engines.base import EngineContext, EngineUnavailable, ModelSpec, SpecIssue
from engines.launch.checkpoint_quant import read_checkpoint_quant
from engines.launch.command import (
    LaunchOptions,
    ResolvedPaths,
    WorkerCommand,
    adapter_paths,
    flag_args,
    flag_name,
    memory_share,
)
from engines.launch.engine import LaunchedEngine
from engines.options import EngineOptions
from engines.spec import KVEventsSpec
from engines.upstream.routing.kv_events import EventSource

__all__ = ["VLLMEngine", "VLLMOptions", "quantization_flag"]

# vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`;
# `--max-lora-rank` takes only these (argparse choices built from the Literal).
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Our speculative methods → vLLM's `SpeculativeConfig.method` (vllm/config/speculative.py:
# SpeculativeMethod). A separate draft model is "draft_model" in 0.26 (an unset method
# with a model also falls back to it, but naming it avoids vLLM guessing from the path).
SPEC_METHODS: dict[str, str] = {
    "ngram": "ngram",
    "draft": "draft_model",
    "eagle": "eagle",
    "eagle3": "eagle3",
}

# Flags the gateway sets from typed fields; an `engine_args` key naming one of them would
# fight the field (argparse keeps the last value), so it is refused with the field to use.
MANAGED_FLAGS: dict[str, str] = {
    "model": "model",
    "served-model-name": "served_model_name",
    "host": "(set by the gateway: workers listen on loopback)",
    "port": "options.base_port",
    "max-model-len": "max_model_len",
    "dtype": "dtype",
    "quantization": "quantization",
    "q": "quantization",
    "speculative-config": "speculative",
    "sc": "speculative",
    "enable-lora": "lora",
    "max-loras": "lora.max_adapters",
    "max-lora-rank": "lora.max_rank",
    "lora-modules": "lora.adapters",
    "max-num-seqs": "batching.max_sequences",
    "max-num-batched-tokens": "batching.max_batched_tokens",
    "tensor-parallel-size": "gpus_per_replica",
    "tp": "gpus_per_replica",
    "runner": "task",
}


class VLLMOptions(LaunchOptions):
    """`options:` of a vllm entry (see `LaunchOptions`); vLLM's own knobs go in
    `engine_args` (e.g. `gpu-memory-utilization: 0.4`, `enforce-eager: true`)."""


def _explicit(section: Any, name: str) -> bool:
    """Whether models.yaml set `name` in `section` (not just the schema default): the
    schema's defaults suit the embedded engine (16 sequences) and would throttle vLLM,
    whose own defaults are sized for the GPU."""
    return name in section.model_fields_set


class VLLMEngine(LaunchedEngine):
    """vLLM workers, launched (`replicas` × `vllm serve`, `gpus_per_replica` GPUs each) or
    attached (`endpoints`). Runtime LoRA load/unload goes to every worker through vLLM's
    `/v1/load_lora_adapter` (launched workers run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True);
    a worker restarted after a crash gets the adapters loaded at runtime re-applied."""

    metrics_prefix: ClassVar[str] = "vllm:"
    label: ClassVar[str] = "vllm"
    program: ClassVar[str] = "vllm"
    options_model: ClassVar[type[EngineOptions]] = VLLMOptions
    # Launched workers publish KV-cache events when `kv_cache_hit` routes on them.
    kv_events_mode: ClassVar[str] = "launch"
    # vLLM keys its prefix cache by the request's `cache_salt`: one domain per tenant.
    takes_cache_salt: ClassVar[bool] = True

    # ------------------------------------------------------------------ config load

    @classmethod
    def check_launch(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues: list[SpecIssue] = []
        if spec.lora is not None and spec.lora.max_rank not in VLLM_LORA_RANKS:
            # vllm/config/lora.py MaxLoRARanks: argparse refuses any other value.
            allowed = ", ".join(map(str, VLLM_LORA_RANKS))
            up = next((r for r in VLLM_LORA_RANKS if r >= spec.lora.max_rank), None)
            issues.append(
                SpecIssue(
                    path="lora.max_rank",
                    message=f"vLLM 0.26 accepts --max-lora-rank {allowed} only"
                    + (f" (use {up})" if up else ""),
                )
            )
        sp = spec.speculative
        if sp is not None and sp.draft_tensor_parallel_size is not None:
            tp = max(spec.gpus_per_replica, 1)
            if sp.method == "ngram":
                issues.append(
                    SpecIssue(
                        path="speculative.draft_tensor_parallel_size",
                        message="ngram has no draft model to parallelise",
                    )
                )
            elif sp.draft_tensor_parallel_size not in (1, tp):
                # vllm/config/speculative.py: "cannot be other value than 1 or target
                # model tensor_parallel_size".
                issues.append(
                    SpecIssue(
                        path="speculative.draft_tensor_parallel_size",
                        message=f"vLLM allows 1 or the target's tensor parallel size ({tp})",
                    )
                )
        if spec.attach:
            return issues
        if not spec.model:
            issues.append(SpecIssue(path="model", message="required to launch vllm"))
            return issues
        for key in spec.engine_args:
            flag = flag_name(key)
            if flag == "kv-events-config" and spec.routing.scorers.get("kv_cache_hit"):
                issues.append(
                    SpecIssue(
                        path=f"engine_args.{key}",
                        message="set by the gateway for kv_cache_hit (one port pair per "
                        "replica from routing.kv_events.base_port); remove it",
                    )
                )
            if flag in MANAGED_FLAGS:
                issues.append(
                    SpecIssue(
                        path=f"engine_args.{key}",
                        message=f"set by the gateway from {MANAGED_FLAGS[flag]}; use that",
                    )
                )
        asc = next(
            (v for k, v in spec.engine_args.items() if flag_name(k) in ("api-server-count", "asc")),
            None,
        )
        if spec.lora is not None and str(asc).isdigit() and int(str(asc)) > 1:
            # vllm/entrypoints/cli/serve.py run_multi_api_server: "VLLM_ALLOW_RUNTIME_LORA_
            # UPDATING cannot be used with api_server_count > 1", raised after the model
            # config is built; the gateway needs runtime loading for `lora`.
            issues.append(
                SpecIssue(
                    path="engine_args.api-server-count",
                    message="vLLM 0.26 refuses runtime LoRA loading (which `lora` needs) "
                    "with more than one API server: remove `lora` or use 1",
                )
            )
        gguf = spec.model.lower().endswith(".gguf")
        if gguf and spec.quantization in ("awq", "gptq"):
            # vLLM 0.26 has no GGUF loader (no "gguf" in LoadFormats of
            # vllm/model_executor/model_loader/__init__.py nor in QuantizationMethods):
            # the gateway converts a GGUF to an unquantized safetensors checkpoint before
            # launch, and vLLM cannot quantize to AWQ/GPTQ at load.
            q = spec.quantization.upper()
            issues.append(
                SpecIssue(
                    path="quantization",
                    message=f"{spec.quantization} needs an {q}-quantized checkpoint; a GGUF "
                    "model is converted to an unquantized one for vLLM 0.26 (which has no "
                    "GGUF loader): use quantization none or fp8",
                )
            )
        elif spec.quantization != "none":
            issue = _quant_mismatch(spec.model, spec.quantization)
            if issue:
                issues.append(SpecIssue(path="quantization", message=issue))
        return issues

    # ------------------------------------------------------------------ command lines

    @classmethod
    def build_argv(
        cls,
        spec: ModelSpec,
        *,
        port: int,
        opts: Any,
        program: list[str],
        paths: ResolvedPaths | None,
    ) -> tuple[list[str], int]:
        """(argv, index of the port value). Flag meanings: vllm/engine/arg_utils.py and
        vllm/entrypoints/openai/cli_args.py of 0.26.0."""
        assert spec.model is not None
        argv = [*program, "serve", paths.model if paths else spec.model]
        argv += ["--served-model-name", spec.upstream_name]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        port_index = len(argv) - 1
        argv += ["--max-model-len", str(spec.max_model_len)]
        if "shutdown_timeout" not in spec.engine_args:
            # On SIGTERM finish running requests for up to the stop grace (vLLM's default,
            # 0, aborts them at once); whole seconds.
            argv += ["--shutdown-timeout", str(math.ceil(opts.stop_grace_s))]
        if spec.dtype != "auto":
            argv += ["--dtype", spec.dtype]
        if spec.task == "embed":
            argv += ["--runner", "pooling"]
        q = quantization_flag(spec, paths.model if paths else spec.model)
        if q is not None:
            argv += ["--quantization", q]
        if spec.gpus_per_replica > 1:
            argv += ["--tensor-parallel-size", str(spec.gpus_per_replica)]
        share = memory_share(spec, opts)
        explicit = {k.replace("_", "-") for k in spec.engine_args}
        if share is not None and "gpu-memory-utilization" not in explicit:
            # Replicas sharing a GPU each take their share (vLLM's default is 0.9 each).
            argv += ["--gpu-memory-utilization", f"{share:g}"]
        b = spec.batching
        if _explicit(spec, "batching") and _explicit(b, "max_sequences"):
            argv += ["--max-num-seqs", str(b.max_sequences)]
        if b.max_batched_tokens is not None:
            argv += ["--max-num-batched-tokens", str(b.max_batched_tokens)]
        if spec.speculative is not None:
            # One JSON argument, parsed with json.loads (arg_utils.py: speculative_config
            # type optional_type(json.loads)).
            cfg = cls.speculative_config(spec, draft_model=paths.draft_model if paths else None)
            argv += ["--speculative-config", json.dumps(cfg, separators=(",", ":"))]
        if spec.lora is not None:
            lora = spec.lora
            argv += ["--enable-lora", "--max-loras", str(lora.max_adapters)]
            argv += ["--max-lora-rank", str(lora.max_rank)]
            if lora.adapters:
                # One flag, all modules after it: LoRAParserAction replaces the list on
                # every occurrence, so a repeated --lora-modules keeps only the last.
                argv.append("--lora-modules")
                for a in lora.adapters:
                    path = paths.adapters.get(a.name, a.path) if paths else a.path
                    argv.append(_lora_module(a.name, path))
        argv += flag_args(spec.engine_args, negate_false=True)
        return argv, port_index

    @classmethod
    def worker_commands(
        cls, spec: ModelSpec, *, ports: list[int] | None = None, paths: ResolvedPaths | None = None
    ) -> list[WorkerCommand]:
        """The launch's commands; with `kv_cache_hit` on, each replica publishes its
        KV-cache events (`kv_events_config`)."""
        commands = super().worker_commands(spec, ports=ports, paths=paths)
        if not spec.routing.scorers.get("kv_cache_hit"):
            return commands
        return [
            replace(
                c,
                argv=[
                    *c.argv,
                    "--kv-events-config",
                    json.dumps(cls.kv_events_config(spec, i), separators=(",", ":")),
                ],
            )
            for i, c in enumerate(commands)
        ]

    @staticmethod
    def kv_events_config(spec: ModelSpec, replica: int) -> dict[str, Any]:
        """vLLM's `--kv-events-config` (vllm/config/kv_events.py, KVEventsConfig) for one
        replica: ZMQ PUB on routing.kv_events.base_port + 2 × replica, its replay ROUTER on
        the next port. `*`: vLLM's publisher binds an endpoint with a wildcard host and
        connects to any other (kv_events.py, `_socket_setup`); the gateway connects to it
        on loopback, where launched workers listen."""
        port = spec.routing.kv_events.base_port + 2 * replica
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{port + 1}",
            "topic": "kv-events",
        }

    @classmethod
    def attach_entry(
        cls, entry: dict[str, Any], host: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The launcher's entry and a front door's attach-mode entry (`serve --workers N`);
        with `kv_cache_hit` on, the front door's entry names each replica's event source
        (every front door subscribes and keeps its own index: a PUB socket serves many)
        and reads the tokenizer from the model's path unless one is given."""
        owned, front = super().attach_entry(entry, host)
        routing = dict(entry.get("routing") or {})
        if not (routing.get("scorers") or {}).get("kv_cache_hit"):
            return owned, front
        kv = dict(routing.get("kv_events") or {})
        base = KVEventsSpec.model_validate(kv).base_port
        kv["sources"] = {
            url: {
                "endpoint": f"tcp://{host}:{base + 2 * i}",
                "replay": f"tcp://{host}:{base + 2 * i + 1}",
                "topic": "kv-events",
            }
            for i, url in enumerate(front["endpoints"])
        }
        model = entry.get("model")
        if not kv.get("tokenizer_path") and isinstance(model, str) and ":" not in model:
            kv["tokenizer_path"] = model
        front["routing"] = {**routing, "kv_events": kv}
        return owned, front

    def kv_event_sources(self, urls: list[str]) -> list[EventSource | None]:
        """Launched replicas: where `kv_events_config` made each publish (in launch order,
        which is the order of `urls`); attached workers: as models.yaml names them."""
        if self.spec.attach:
            return super().kv_event_sources(urls)
        out: list[EventSource | None] = []
        for i in range(len(urls)):
            cfg = self.kv_events_config(self.spec, i)
            pub, replay = (
                c.replace("*", "127.0.0.1") for c in (cfg["endpoint"], cfg["replay_endpoint"])
            )
            out.append(EventSource(pub, replay, cfg["topic"]))
        return out

    @staticmethod
    def speculative_config(spec: ModelSpec, *, draft_model: str | None = None) -> dict[str, Any]:
        """The `--speculative-config` object (field names of vllm/config/speculative.py
        SpeculativeConfig)."""
        sp = spec.speculative
        assert sp is not None
        cfg: dict[str, Any] = {"method": SPEC_METHODS[sp.method]}
        if sp.method != "ngram":
            cfg["model"] = draft_model or sp.model
        cfg["num_speculative_tokens"] = sp.num_speculative_tokens
        # ngram: vLLM fills a missing bound from the other one, or 5/5 when both are
        # missing; pass only what models.yaml says.
        if sp.prompt_lookup_max is not None:
            cfg["prompt_lookup_max"] = sp.prompt_lookup_max
        if sp.prompt_lookup_min is not None:
            cfg["prompt_lookup_min"] = sp.prompt_lookup_min
        if sp.draft_tensor_parallel_size is not None:
            cfg["draft_tensor_parallel_size"] = sp.draft_tensor_parallel_size
        return cfg

    @staticmethod
    def build_env(spec: ModelSpec, gpus: list[int]) -> dict[str, str]:
        env: dict[str, str] = {}
        if spec.gpus_per_replica > 0:
            # Each replica sees only its own GPUs, as devices 0..n-1.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if spec.lora is not None:
            # vllm/envs.py: the runtime /v1/load_lora_adapter and /v1/unload_lora_adapter
            # routes exist only when this is "1" or "true" (case-insensitive).
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env

    # ------------------------------------------------------------------ lifecycle

    async def resolve_paths(self, ctx: EngineContext) -> ResolvedPaths:
        paths = await super().resolve_paths(ctx)
        if self.spec.quantization != "none":
            # The same check as at config load, now on the resolved local checkpoint.
            issue = _quant_mismatch(paths.model, self.spec.quantization)
            if issue:
                raise EngineUnavailable(f"model {self.spec.name!r}: quantization: {issue}")
        return paths

    @classmethod
    def start_waves(cls, spec: ModelSpec, opts: LaunchOptions) -> list[list[int]]:
        """One wave when the KV cache has a fixed size (`--kv-cache-memory-bytes`): vLLM
        then skips sizing it from free memory, so replicas sharing a GPU may start
        together."""
        if any(flag_name(k) == "kv-cache-memory-bytes" for k in spec.engine_args):
            return [list(range(spec.replicas))]
        return super().start_waves(spec, opts)

    async def apply_start_adapters(self) -> None:
        """Launched workers got `lora.adapters` on their command line (--lora-modules):
        only record them, so a restarted worker's state is known. Attached workers get
        them through the runtime API (OpenAIEngine's default)."""
        if self.spec.attach or self.spec.lora is None:
            await super().apply_start_adapters()
            return
        paths = adapter_paths(self.spec, self._context().config_dir)
        for a in self.spec.lora.adapters:
            self._adapters[a.name] = paths[a.name]


def _lora_module(name: str, path: str) -> str:
    # vllm/entrypoints/openai/cli_args.py LoRAParserAction: "name=path" is split on every
    # "=", so a path holding "=" or "," must use the JSON form instead.
    if "=" in path or "," in path:
        return json.dumps({"name": name, "path": path}, separators=(",", ":"))
    return f"{name}={path}"


def quantization_flag(spec: ModelSpec, model: str) -> str | None:
    """The `--quantization` value for an entry, or None to let vLLM read the checkpoint.

    - A local checkpoint with its own `quantization_config` (checked against
      `quantization:` at load, `_quant_mismatch`): no flag. vLLM reads the config and picks
      the kernel itself (vllm/config/model.py _verify_quantization; for compressed-tensors
      W4A16, kernels/linear/__init__.py choose_mp_linear_kernel tries CutlassW4A8, Machete,
      AllSpark, Marlin, Conch, Exllama, TritonW4A16 in that order and takes the first whose
      can_implement accepts the layer; on the H200, SmolLM2's W4A16 layers got Marlin,
      padded, and Machete: docs/gpu.md). Naming a method here would only fail: a
      compressed-tensors checkpoint (what llm-compressor's AWQ and GPTQ recipes write) under
      `--quantization awq` is "Quantization method specified in the model config
      (compressed-tensors) does not match" (ValueError). For AutoAWQ/GPTQ-format
      checkpoints the flag would change nothing in 0.26 (auto_awq.py
      override_quantization_method accepts awq, awq_marlin, auto_awq and marlin alike).
    - An unquantized local checkpoint with `fp8`: `--quantization fp8`, quantized online
      at load (awq/gptq on it are refused at load).
    - A checkpoint that cannot be read here (a hub id): the declared method as written, so
      vLLM itself checks the checkpoint against it.
    """
    if spec.quantization == "none":
        return None
    found = read_checkpoint_quant(model)
    if found is not None and found.quantized:
        return None
    return spec.quantization


def _quant_mismatch(model: str, quantization: str) -> str | None:
    """Why a local checkpoint cannot be served with `quantization` by vLLM, if it can't
    (`engines.launch.checkpoint_quant` says what satisfies what). vllm/config/model.py
    _verify_quantization: awq/gptq load pre-quantized weights only, fp8 also quantizes
    unquantized weights online."""
    found = read_checkpoint_quant(model)
    if found is None or found.satisfies(quantization):
        return None
    if not found.quantized:
        return (
            f"{model} is not {quantization.upper()}-quantized (no quantization_config); "
            f"vLLM loads {quantization.upper()} weights but does not quantize to it"
        )
    return f"{model} is quantized with {found.describe()!r}, not {quantization!r}"
