"""The LMDeploy engine: `lmdeploy serve api_server` worker processes built from a
models.yaml entry, or attached by URL.

Owns: the mapping of a `ModelSpec` to LMDeploy 0.18.0's command line (`worker_commands`),
the choice between its two backends (TurboMind, PyTorch), the refusals of what 0.18.0
cannot do (`check_spec`), and what makes its answers look like OpenAI's: its error shapes
(`normalise_error`), the extra fields of its responses and the `role` it repeats in every
stream delta (`transform_response`, `transform_chunk`). Its `lmdeploy:*` metrics are read
by `engines.upstream.worker_metrics` (any upstream engine's pool may hold LMDeploy workers).

Adapter policy (refusal): LMDeploy takes LoRA adapters only at start, on the PyTorch
backend (`--adapters name=path ...`); it has no runtime load/unload API. So `lora.adapters`
are passed at launch, `load_adapter`/`unload_adapter` raise `AdapterError` saying so, and a
`lora.roots` entry (which only governs runtime loads) is refused at config load. Changing
the adapter set means editing models.yaml and restarting the model.

Does not own: relaying, streaming, retries and health (`engines.upstream.engine.OpenAIEngine`),
process supervision (`engines.launch.supervisor`). lmdeploy is never imported: the gateway runs its
CLI.

Every fact about LMDeploy below was read in LMDeploy 0.18.0's own source (the wheel
lmdeploy-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl from PyPI); the file is named where
used.

Why one module of ~650 lines: everything LMDeploy-specific is here and nowhere else — its
flag tables, its support matrix (backends × quantization × checkpoint formats), and the
clean-up of its non-OpenAI response fields; split, each piece would need the others' tables.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from engines.base import (
    AdapterError,
    EngineContext,
    EngineUnavailable,
    InvalidRequest,
    ModelSpec,
    ServingError,
    SpecIssue,
    UpstreamError,
)
from engines.launch.checkpoint_quant import CheckpointQuant, read_checkpoint_quant
from engines.launch.command import (
    LaunchOptions,
    ResolvedPaths,
    flag_args,
    flag_name,
    memory_share,
)
from engines.launch.engine import LaunchedEngine
from engines.options import EngineOptions

__all__ = ["LMDeployEngine", "LMDeployOptions", "resolve_backend"]

Backend = Literal["turbomind", "pytorch"]

# lmdeploy/cli/utils.py add_spec_group: --speculative-algorithm choices are eagle, eagle3,
# deepseek_mtp, hy3_mtp, qwen3_5_mtp, dflash. Of our methods only these two exist there.
SPEC_ALGORITHMS: dict[str, str] = {"eagle": "eagle", "eagle3": "eagle3"}

# Flags the gateway sets from typed fields (see engines.launch.vllm.MANAGED_FLAGS for why).
MANAGED_FLAGS: dict[str, str] = {
    "model-path": "model",
    "server-name": "(set by the gateway: workers listen on loopback)",
    "server-port": "options.base_port",
    "model-name": "served_model_name",
    "backend": "options.backend",
    "session-len": "max_model_len",
    "dtype": "dtype",
    "model-format": "quantization",
    "tp": "gpus_per_replica",
    "max-batch-size": "batching.max_sequences",
    "max-prefill-token-num": "batching.max_batched_tokens",
    "cache-max-entry-count": "options.cache_max_entry_count",
    "adapters": "lora.adapters",
    "speculative-algorithm": "speculative.method",
    "speculative-draft-model": "speculative.model",
    "speculative-num-draft-tokens": "speculative.num_speculative_tokens",
}


class LMDeployOptions(LaunchOptions):
    """`options:` of an lmdeploy entry (besides `LaunchOptions`)."""

    launch_only: ClassVar[frozenset[str]] = frozenset({"cache_max_entry_count"})

    # The backend the workers run (launch), or run already (attach: it decides which
    # features the entry may use). Default: chosen by `resolve_backend`.
    backend: Backend | None = None
    # --cache-max-entry-count: share of free GPU memory for the k/v cache (0.8 in LMDeploy).
    cache_max_entry_count: float | None = Field(default=None, gt=0)


def resolve_backend(spec: ModelSpec) -> Backend:
    """`options.backend`, or the backend the entry needs: PyTorch for LoRA adapters and
    speculative decoding (TurboMind has neither) and for FP8 (PyTorch quantizes an
    unquantized checkpoint to blocked FP8 online and loads FP8 checkpoints; TurboMind only
    loads the latter); TurboMind, LMDeploy's own default, otherwise."""
    chosen = spec.options.get("backend")
    if chosen in ("turbomind", "pytorch"):
        return "pytorch" if chosen == "pytorch" else "turbomind"
    if spec.lora is not None or spec.speculative is not None or spec.quantization == "fp8":
        return "pytorch"
    return "turbomind"


def _explicit(section: Any, name: str) -> bool:
    # The schema's default of 16 sequences suits the embedded engine; LMDeploy sizes its
    # own default to the device, so pass only what models.yaml says.
    return name in section.model_fields_set


class LMDeployEngine(LaunchedEngine):
    """LMDeploy workers (`lmdeploy serve api_server`), launched or attached, with answers
    cleaned to OpenAI's shapes.

    Adapters: only at start, PyTorch backend (`lora.adapters` → `--adapters`). LMDeploy
    0.18 has no runtime adapter API, so `load_adapter` / `unload_adapter` refuse with
    `AdapterError`; to change adapters, edit models.yaml and restart the model. In attach
    mode the workers are assumed to have been started with the listed adapters."""

    metrics_prefix: ClassVar[str] = "lmdeploy:"
    label: ClassVar[str] = "lmdeploy"
    program: ClassVar[str] = "lmdeploy"
    options_model: ClassVar[type[EngineOptions]] = LMDeployOptions
    # LMDeploy publishes no KV-cache events: `kv_cache_hit` is refused.
    kv_events_mode: ClassVar[str] = "none"
    continuation_unsupported: ClassVar[str | None] = (
        "LMDeploy's chat API has no continue_final_message, and its stream chunks are "
        "rewritten (transform_chunk): mid-stream continuation needs vLLM-compatible workers"
    )

    # Bound on streams whose first delta (the one keeping `role`) has been seen.
    _ROLE_MEMORY = 4096

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        self._role_seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    # ------------------------------------------------------------------ config load

    @classmethod
    def check_launch(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues: list[SpecIssue] = []
        backend = resolve_backend(spec)
        explicit = "backend" in spec.options
        where = "options.backend" if explicit else "quantization"

        def refuse(path: str, message: str) -> None:
            issues.append(SpecIssue(path=path, message=message))

        if spec.task == "embed":
            # lmdeploy/serve/openai/endpoints/auxiliary.py: /v1/embeddings always answers
            # 400 "Unsupported by turbomind.".
            refuse("task", "LMDeploy 0.18 serves no embeddings (/v1/embeddings is a stub)")
        if spec.dtype == "float32":
            # lmdeploy/cli/utils.py --dtype choices: auto, float16, bfloat16.
            refuse("dtype", "LMDeploy accepts auto, float16 or bfloat16")

        lora = spec.lora
        if lora is not None:
            if lora.roots:
                refuse(
                    "lora.roots",
                    "LMDeploy 0.18 cannot load adapters at runtime (no load/unload API); "
                    "list them under lora.adapters, loaded at start on the PyTorch backend",
                )
            if backend == "turbomind":
                # lmdeploy/cli/serve.py: --adapters is read only into PytorchEngineConfig;
                # TurbomindEngineConfig has no adapters and would ignore them silently.
                refuse(
                    "lora",
                    "LoRA adapters need the PyTorch backend (TurboMind ignores --adapters); "
                    "set options.backend: pytorch or leave it unset",
                )

        sp = spec.speculative
        if sp is not None:
            if sp.method not in SPEC_ALGORITHMS:
                refuse(
                    "speculative.method",
                    f"LMDeploy 0.18 has no {sp.method} speculative decoding "
                    "(--speculative-algorithm: eagle, eagle3, deepseek_mtp, hy3_mtp, "
                    "qwen3_5_mtp, dflash)",
                )
            if sp.draft_tensor_parallel_size is not None:
                refuse(
                    "speculative.draft_tensor_parallel_size",
                    "LMDeploy 0.18 has no option for the draft model's parallelism",
                )
            if backend == "turbomind":
                # lmdeploy/serve/core/async_engine.py: "speculative decoding is not
                # supported by turbomind" (a warning; the config is then ignored).
                refuse(
                    "speculative",
                    "speculative decoding needs the PyTorch backend (TurboMind ignores it)",
                )

        issues += cls._quantization_issues(spec, backend, where)

        opts = cls.launch_options(spec)
        assert isinstance(opts, LMDeployOptions)
        c = opts.cache_max_entry_count
        if c is not None and backend == "pytorch" and not 0 < c < 1:
            # lmdeploy/messages.py PytorchEngineConfig: assert 0 < cache_max_entry_count < 1.
            refuse("options.cache_max_entry_count", "the PyTorch backend needs 0 < value < 1")

        if spec.attach:
            return issues
        if not spec.model:
            refuse("model", "required to launch lmdeploy")
        if spec.gpus_per_replica == 0:
            # lmdeploy/cli/utils.py --device choices: cuda, ascend, maca, camb (no CPU).
            refuse("gpus_per_replica", "LMDeploy runs on GPUs only: give at least 1")
        for key in spec.engine_args:
            flag = flag_name(key)
            if flag in MANAGED_FLAGS:
                refuse(
                    f"engine_args.{key}",
                    f"set by the gateway from {MANAGED_FLAGS[flag]}; use that",
                )
        return issues

    @staticmethod
    def _quantization_issues(
        spec: ModelSpec, backend: Backend, where: str, model: str | None = None
    ) -> list[SpecIssue]:
        """What LMDeploy 0.18's support matrix refuses for this quantization on `backend`
        (`model`: the resolved checkpoint at launch, models.yaml's reference at load)."""
        q = spec.quantization
        if q == "none":
            return []
        model = model or spec.model or ""
        gguf = model.lower().endswith(".gguf")
        found = None if gguf else read_checkpoint_quant(model)
        out: list[SpecIssue] = []
        if q == "gptq" and backend == "pytorch":
            # lmdeploy/pytorch/config.py: the PyTorch engine's quant methods are awq,
            # smooth_quant, fp8 and compressed-tensors; gptq → "Unsupported quant method".
            why = "" if "backend" in spec.options else "LoRA / speculative decoding need PyTorch; "
            out.append(
                SpecIssue(
                    path=where,
                    message=f"{why}GPTQ runs on TurboMind only (the PyTorch engine has no "
                    "GPTQ kernels)",
                )
            )
        if q in ("awq", "gptq"):
            if gguf:
                out.append(
                    SpecIssue(
                        path="quantization",
                        message=f"{q} needs an {q.upper()}-quantized checkpoint; a GGUF model "
                        "is converted to an unquantized one (LMDeploy loads no GGUF): use "
                        "quantization none or fp8",
                    )
                )
            elif found is not None and not found.quantized:
                out.append(
                    SpecIssue(
                        path="quantization",
                        message=f"{model} is not {q.upper()}-quantized (no quantization_config)"
                        f"; LMDeploy loads {q.upper()} weights but does not quantize to it",
                    )
                )
        if found is not None and found.quantized:
            if not found.satisfies(q):
                # lmdeploy/turbomind/converter.py: 'mismatched quant method'.
                out.append(
                    SpecIssue(
                        path="quantization",
                        message=f"{model} is quantized with {found.describe()!r}, not {q!r}",
                    )
                )
            else:
                refusal = _unsupported_checkpoint(found, backend)
                if refusal:
                    out.append(SpecIssue(path=where, message=f"{model}: {refusal}"))
        if q == "fp8" and backend == "turbomind" and not (found and found.method == "fp8"):
            # lmdeploy/turbomind/weight_format.py FP8Format accepts only fp8 weights with
            # weight_scale_inv: TurboMind loads blocked-FP8 checkpoints, it does not
            # quantize. The PyTorch engine does (lmdeploy/pytorch/config.py
            # _patch_quantization_config, GPUs with sm ≥ 90).
            out.append(
                SpecIssue(
                    path=where,
                    message="TurboMind serves FP8 only from a pre-quantized blocked-FP8 "
                    "checkpoint (a local directory whose config.json says quant_method "
                    "fp8); for online FP8 use the PyTorch backend",
                )
            )
        return out

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
        """(argv, index of the port value). Flag meanings: lmdeploy/cli/serve.py
        (add_parser_api_server) and lmdeploy/cli/utils.py (ArgumentHelper) of 0.18.0."""
        assert spec.model is not None and isinstance(opts, LMDeployOptions)
        backend = resolve_backend(spec)
        argv = [*program, "serve", "api_server", paths.model if paths else spec.model]
        argv += ["--server-name", "127.0.0.1", "--server-port", str(port)]
        port_index = len(argv) - 1
        argv += ["--model-name", spec.upstream_name, "--backend", backend]
        argv += ["--session-len", str(spec.max_model_len)]
        if spec.dtype != "auto":
            argv += ["--dtype", spec.dtype]
        fmt = cls.model_format(spec, backend, paths.model if paths else None)
        if fmt is not None:
            argv += ["--model-format", fmt]
        if spec.gpus_per_replica > 1:
            argv += ["--tp", str(spec.gpus_per_replica)]
        b = spec.batching
        if _explicit(spec, "batching") and _explicit(b, "max_sequences"):
            argv += ["--max-batch-size", str(b.max_sequences)]
        if b.max_batched_tokens is not None:
            # LMDeploy's per-iteration token budget is a prefill budget (default 8192).
            argv += ["--max-prefill-token-num", str(b.max_batched_tokens)]
        cache_share = opts.cache_max_entry_count
        if cache_share is None:
            # Replicas sharing a GPU: each k/v cache takes its share (LMDeploy's is 0.8).
            cache_share = memory_share(spec, opts)
        if cache_share is not None:
            argv += ["--cache-max-entry-count", f"{cache_share:g}"]
        if spec.lora is not None and spec.lora.adapters:
            # One flag, nargs='*', each "name=path" split on its first "=" (cli/utils.py
            # get_lora_adapters); names cannot hold "=" (spec pattern), paths may.
            argv.append("--adapters")
            for a in spec.lora.adapters:
                path = paths.adapters.get(a.name, a.path) if paths else a.path
                argv.append(f"{a.name}={path}")
        sp = spec.speculative
        if sp is not None and sp.method in SPEC_ALGORITHMS:
            draft = (paths.draft_model if paths else None) or sp.model
            argv += ["--speculative-algorithm", SPEC_ALGORITHMS[sp.method]]
            argv += ["--speculative-draft-model", str(draft)]
            argv += ["--speculative-num-draft-tokens", str(sp.num_speculative_tokens)]
        # LMDeploy's booleans are store_true flags with no --no- form: false is omitted.
        argv += flag_args(spec.engine_args, negate_false=False)
        return argv, port_index

    @staticmethod
    def model_format(spec: ModelSpec, backend: Backend, model: str | None = None) -> str | None:
        """--model-format for the quantization (choices hf, awq, gptq, compressed-tensors,
        fp8, mxfp4), or None to let LMDeploy read the checkpoint's own
        quantization_config. A local checkpoint that carries one (checked at load) gets
        none: TurboMind takes its method from the config and asserts that a given
        --model-format equals it (lmdeploy/turbomind/converter.py "mismatched quant
        method"), so "awq" would break a compressed-tensors AWQ checkpoint. The PyTorch
        engine reads the flag only as "quantize an unquantized model online", which exists
        for fp8 alone (lmdeploy/pytorch/config.py _patch_quantization_config raises for
        anything else). A checkpoint not readable here (a hub id) on TurboMind gets the
        declared method, as before."""
        q = spec.quantization
        if q == "none":
            return None
        found = read_checkpoint_quant(model or spec.model or "")
        if found is not None and found.quantized:
            return None
        if backend == "turbomind":
            return q
        return "fp8" if q == "fp8" else None

    # ------------------------------------------------------------------ backend probe

    async def start_workers(self) -> list[str]:
        """Launch: when the backend was left to the gateway and would be TurboMind, first
        ask the worker's own Python whether LMDeploy's TurboMind extension is there
        (`turbomind_available`). Without it LMDeploy itself would fall back to its PyTorch
        engine (lmdeploy/archs.py autoget_backend: "Fallback to pytorch engine because
        turbomind is not built"); the gateway makes that choice explicit (`--backend
        pytorch`, as if models.yaml said so) so that `resolve_paths` checks the entry
        against the PyTorch engine's support matrix and refuses what it cannot serve
        (GPTQ; compressed-tensors other than W4A16 symmetric group 32 on an architecture
        whose LMDeploy model passes module prefixes) instead of failing in the worker."""
        spec = self.spec
        if (
            not spec.attach
            and "backend" not in spec.options
            and resolve_backend(spec) == ("turbomind")
        ):
            opts = self.launch_options(spec)
            available = await turbomind_available(opts.command or [self.program], opts.env)
            if available is False:
                self.progress(
                    f"model {spec.name!r}: LMDeploy's TurboMind extension is not installed "
                    "for this worker; using its PyTorch engine"
                )
                options = {**spec.options, "backend": "pytorch"}
                self.spec = spec.model_copy(update={"options": options})
        return await super().start_workers()

    async def resolve_paths(self, ctx: EngineContext) -> ResolvedPaths:
        """The resolved checkpoint checked against the backend that will run it."""
        paths = await super().resolve_paths(ctx)
        backend = resolve_backend(self.spec)
        issues = self._quantization_issues(self.spec, backend, "quantization", paths.model)
        if issues:
            raise EngineUnavailable(
                f"model {self.spec.name!r} on LMDeploy's {backend} backend: "
                + "; ".join(f"{i.path}: {i.message}" for i in issues)
            )
        return paths

    # ------------------------------------------------------------------ adapters

    async def apply_start_adapters(self) -> None:
        """The adapters are on the command line (launch) or the worker's own (attach):
        nothing to load. They are not recorded as runtime adapters, so nothing ever tries
        to re-apply them through a runtime API LMDeploy lacks."""

    def adapters(self) -> list[str]:
        return [a.name for a in self.spec.lora.adapters] if self.spec.lora else []

    async def load_adapter(self, name: str, path: str) -> None:
        raise AdapterError(
            f"model {self.spec.name!r} runs on LMDeploy, which takes LoRA adapters only at "
            "start (PyTorch backend) and cannot load one at runtime: add it to "
            "lora.adapters in models.yaml and restart the model",
            param="lora_name",
            code="adapter_runtime_unsupported",
        )

    async def unload_adapter(self, name: str) -> None:
        raise AdapterError(
            f"model {self.spec.name!r} runs on LMDeploy, which cannot unload an adapter at "
            "runtime: remove it from lora.adapters in models.yaml and restart the model",
            param="lora_name",
            code="adapter_runtime_unsupported",
        )

    # ------------------------------------------------------------------ answers

    def normalise_error(self, status: int, body: bytes) -> ServingError:
        """LMDeploy 0.18 answers errors as `{"message","type","code": <HTTP status>,
        "param","object":"error"}` with that status (lmdeploy/serve/openai/errors.py), and
        mid-stream as `data: {"error": {...same...}}` with the stream's 200. The base class
        reads both; this adds what the integer code loses: context-length errors
        (serve/core/async_engine.py: "... model context length ...") get OpenAI's code,
        and 499 (request cancelled inside LMDeploy) is the worker's fault, not the
        client's."""
        err = super().normalise_error(status, body)
        text = err.message.lower()
        if isinstance(err, InvalidRequest) and "context length" in text:
            err.code = "context_length_exceeded"
        if status == 499:
            return UpstreamError(f"the LMDeploy worker cancelled the request: {err.message}")
        return err

    # Fields LMDeploy adds to choices for its own clients; dropped when null, kept when a
    # client asked for them with LMDeploy's extension parameters.
    _EXTRA_CHOICE_FIELDS = ("output_ids", "routed_experts", "output_token_logprobs")

    def transform_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Whole responses: drop LMDeploy's null extension fields (`output_ids`,
        `routed_experts`, `output_token_logprobs`) and the message's null
        `reasoning_content` / `tool_calls`, which OpenAI leaves out."""
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            _drop_nulls(choice, self._EXTRA_CHOICE_FIELDS)
            msg = choice.get("message")
            if isinstance(msg, dict):
                _drop_nulls(msg, ("reasoning_content", "tool_calls"))
        return obj

    def transform_chunk(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Stream chunks: LMDeploy puts `"role": "assistant"` in every delta; OpenAI only
        in the first of each choice. Also drops the null extension fields."""
        rid = str(obj.get("id", ""))
        seen = self._role_seen
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            _drop_nulls(choice, self._EXTRA_CHOICE_FIELDS)
            delta = choice.get("delta")
            slot = (rid, int(choice.get("index") or 0))
            if isinstance(delta, dict):
                if delta.get("reasoning_content", 0) is None:
                    del delta["reasoning_content"]
                if "role" in delta:
                    if slot in seen:
                        del delta["role"]
                    else:
                        seen[slot] = None
                        if len(seen) > self._ROLE_MEMORY:
                            seen.popitem(last=False)  # a stream that never finished
            if choice.get("finish_reason") is not None:
                seen.pop(slot, None)
        return obj


def _drop_nulls(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Remove `keys` whose value is null: extension fields OpenAI's shapes leave out."""
    for key in keys:
        if key in obj and obj[key] is None:
            del obj[key]


# `python -c` run with the worker's interpreter: exit 0 when TurboMind's extension loads,
# 3 when LMDeploy is there without it (lmdeploy/turbomind/__init__.py is_available()).
_TURBOMIND_PROBE = "import sys, lmdeploy.turbomind as t; sys.exit(0 if t.is_available() else 3)"


def _worker_python(program: list[str]) -> list[str] | None:
    """The interpreter that runs `program` (`[python, -m, lmdeploy]`, or an `lmdeploy`
    console script whose first line names it), or None when that cannot be told."""
    if len(program) >= 3 and program[1:3] == ["-m", "lmdeploy"]:
        return [program[0]]
    if len(program) != 1:
        return None
    exe = shutil.which(program[0])
    if exe is None:
        return None
    try:
        with Path(exe).open("rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        return shlex.split(first[2:])
    return None


async def turbomind_available(
    program: list[str], env: dict[str, str], timeout_s: float = 120.0
) -> bool | None:
    """Whether the LMDeploy that `program` runs has TurboMind (None: could not tell; the
    gateway then leaves `--backend turbomind`, which LMDeploy itself falls back from)."""
    python = _worker_python(program)
    if python is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            *python,
            "-c",
            _TURBOMIND_PROBE,
            env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        rc = await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    return {0: True, 3: False}.get(rc)


# Architectures whose LMDeploy 0.18 PyTorch model builds its Linear layers with module
# prefixes (lmdeploy/pytorch/models/*.py passing `prefix=`, names from module_map.py).
_PT_PREFIXED_ARCHS = frozenset(
    {
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
        "DeepseekV32ForCausalLM",
        "Glm4MoeLiteForCausalLM",
        "GlmMoeDsaForCausalLM",
        "HYV3ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    }
)


def _unsupported_checkpoint(found: CheckpointQuant, backend: Backend) -> str | None:
    """Why LMDeploy 0.18's `backend` cannot load this (already matching) quantized
    checkpoint, or None."""
    if found.method == "compressed-tensors":
        g = found.ct_group() or {}
        w = g.get("weights") or {}
        fmt = found.config.get("format") or g.get("format")
        if backend == "pytorch":
            # lmdeploy/pytorch/config.py _parse_compressed_tensors_config: pack-quantized,
            # one group `group_0` on Linear, no activation quantization, weights exactly
            # 4-bit int, group 32, symmetric, static.
            want = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}
            ok = (
                fmt == "pack-quantized"
                and g.get("input_activations") is None
                and all(w.get(k) == v for k, v in want.items())
                and w.get("symmetric") is True
            )
            arch = found.architecture
            if ok and arch not in _PT_PREFIXED_ARCHS:
                # lmdeploy/pytorch/config.py get_quant_method: compressed-tensors
                # "dispatch requires a non-empty canonical module prefix", and only these
                # models pass one when building their layers (llama.py passes none: seen
                # failing with SmolLM2 on the H200, docs/gpu.md).
                return (
                    f"LMDeploy 0.18's PyTorch engine loads compressed-tensors only for "
                    f"{', '.join(sorted(_PT_PREFIXED_ARCHS))}, not {arch or 'this model'} "
                    "(serve it with vLLM, or convert it with `gateway awq-export`)"
                )
            if not ok:
                return (
                    "LMDeploy's PyTorch engine loads compressed-tensors only as W4A16, "
                    "symmetric, group size 32, pack-quantized (e.g. `gateway quantize … "
                    "--method awq --scheme W4A16 --group-size 32`); this one is "
                    f"{found.describe()} group {w.get('group_size')}, "
                    f"{'symmetric' if w.get('symmetric') else 'asymmetric'}"
                )
            return None
        # lmdeploy/turbomind/converter.py: pack-quantized, 4-bit int, group 32 or 128.
        if (
            w.get("num_bits") != 4
            or w.get("type") != "int"
            or w.get("group_size")
            not in (
                32,
                128,
            )
        ):
            return (
                "TurboMind loads compressed-tensors only as 4-bit int weights in groups of "
                f"32 or 128; this one is {found.describe()} group {w.get('group_size')}"
            )
        return None
    if backend == "turbomind" and found.method in ("awq", "gptq"):
        # converter.py _SUPPORTED_GROUP_SIZES: awq and gptq {128}.
        size = found.config.get("group_size", 128)
        if size != 128:
            hint = "; set options.backend: pytorch to use LMDeploy's PyTorch engine"
            return (
                f"TurboMind loads {found.method.upper()} with group size 128 only, not {size}"
                + (hint if found.method == "awq" else "")
            )
    if backend == "pytorch" and found.method == "awq":
        return _pytorch_awq_refusal(found.config)
    return None


def _pytorch_awq_refusal(q: dict[str, Any]) -> str | None:
    """Why LMDeploy 0.18's PyTorch engine cannot run this AutoAWQ checkpoint, or None.
    pytorch/config.py reads `bits` (default 4) and `group_size` (default 128) and builds
    AwqLinear (pytorch/nn/linear/awq.py: qweight int32 [in, out/8], the GEMM layout);
    without TurboMind's extension the layer runs pytorch/kernels/cuda/awq_kernels.py,
    which unpacks 4-bit fields and tiles K by the group size (`BLOCK_SIZE_K=group_size`:
    Triton needs a power of two, and tl.dot at least 16)."""
    bits, size = q.get("bits", 4), q.get("group_size", 128)
    version = str(q.get("version", "gemm")).lower()
    if bits != 4:
        return f"LMDeploy's PyTorch engine runs 4-bit AWQ only, not {bits}-bit"
    if version != "gemm":
        return f"LMDeploy's PyTorch engine loads AutoAWQ's GEMM layout, not {version!r}"
    if not isinstance(size, int) or size < 16 or size & (size - 1):
        return (
            "LMDeploy's PyTorch engine runs AWQ with a power-of-two group size of at "
            f"least 16 (its Triton kernel tiles by the group), not {size}"
        )
    return None
