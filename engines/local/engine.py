"""The embedded `transformers` engine: a real model served in process, on CPU or GPU.

Owns: the `Engine` implementation registered as "transformers": spec checks, start-up
(fetch/convert through `engines.model_source`, load, warm up), the asyncio side of a
request (submitting its sequences, gathering their events, cancelling on disconnect),
embeddings requests and LoRA adapter bookkeeping. Does not own request → prompt and
sampling (`engines.local.prompts`), response shapes (`engines.local.shapes`), the decode
loop (`engines.local.batcher`), text deltas and stop strings (`engines.local.text`),
encoders (`engines.local.embed`), nor any HTTP.

This module imports neither torch nor transformers at import time: `gateway check` imports
engine classes only to call `check_spec`.

Why ~500 lines: the engine is the one place the request, the batcher, the grammar and the
response shapes meet; its pieces with a concern of their own are already their own modules
(prompts, shapes, structured, batcher, kvcache, text, embed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import orjson
from pydantic import Field

from engines import model_source
from engines.base import (
    AdapterError,
    AdapterNotFound,
    Completed,
    EmbedRequest,
    EngineBase,
    EngineContext,
    EngineOverloaded,
    EngineStatus,
    EngineUnavailable,
    GenerateRequest,
    InvalidRequest,
    ModelSpec,
    ServingError,
    SpecIssue,
    Usage,
)
from engines.local import shapes
from engines.local.shapes import ChoiceState
from engines.options import EngineOptions, options_issues, parse_options

if TYPE_CHECKING:
    from engines.local.batcher import Batcher, SeqEvent, Sequence
    from engines.local.embed import Embedder
    from engines.local.structured import Grammars

__all__ = ["LocalEngine"]


class _Job:
    """One request's sequences in the batcher and the asyncio side of their events."""

    def __init__(self, engine: LocalEngine, seqs: list[Sequence], choices: list[ChoiceState]):
        self.engine = engine
        self.seqs = seqs
        self.choices = choices
        self.queue: asyncio.Queue[tuple[int, SeqEvent]] = asyncio.Queue()
        self.pending = len(seqs)
        self.prompt_tokens = 0

    async def next_events(self) -> list[tuple[int, SeqEvent]]:
        """Every event available now (waits for at least one)."""
        first = await self.queue.get()
        batch = [first]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        for _, ev in batch:
            if ev.error is not None:
                self.pending = 0
                raise ev.error
            if ev.finish_reason is not None:
                self.pending -= 1
        return batch

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in self.choices),
        )

    def cancel(self) -> None:
        """Consumer gone: unfinished sequences leave the batch at the next step."""
        live = [s for s in self.seqs if not s.done]
        if live and self.engine._batcher is not None:
            self.engine._batcher.cancel(live)


class LocalOptions(EngineOptions):
    """`options:` of a transformers entry (see `LocalEngine`)."""

    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda|cuda:[0-9]+)$")
    threads: int | None = Field(default=None, ge=1)
    max_waiting: int = Field(default=1024, ge=1)


class LocalEngine(EngineBase):
    """The embedded transformers engine (`engine: transformers` in models.yaml).

    `task: generate` serves chat and completions through a continuous batcher (requests
    join and leave a running batch between decode steps; `batching.max_sequences` caps
    the batch, `batching.max_batched_tokens` one step's prefill, the rest wait) with
    PEFT LoRA adapters loaded and unloaded at runtime. `task: embed` serves
    sentence-transformers style embeddings.

    `options` (all optional):
      device: "cpu" (default), "cuda", "cuda:N" or "auto" (cuda when available);
      threads: torch intra-op threads (default: the CPUs this process may use, less one
        for the event loop that parses requests and writes the streams; see _setup_torch);
      max_waiting: sequences allowed to wait for a batch slot before requests are
        refused with 429 (default 1024).
    `dtype: auto` means bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX,
    measured faster there), float32 otherwise.

    Requests may carry the vLLM extension `ignore_eos: true` (benchmarks use it).
    """

    options_model: ClassVar[type[EngineOptions]] = LocalOptions

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        self.ctx = context or EngineContext(
            cache_dir=Path.home() / ".cache" / "llm-gateway", config_dir=Path.cwd()
        )
        opts = parse_options(spec, LocalOptions)
        self._device_opt = opts.device
        self._threads: int | None = opts.threads
        self._max_waiting = opts.max_waiting
        self._batcher: Batcher | None = None
        self._embedder: Embedder | None = None
        self._tok: Any = None
        self._token_info: Callable[[int], tuple[str, list[int]]] | None = None
        self._grammar_tok: Grammars | None = None
        self._template_tools = False
        self._context_len = spec.max_model_len
        self._vocab = 0
        self._adapters: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._detail = "not started"

    # ------------------------------------------------------------------ spec

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues: list[SpecIssue] = []

        def no(path: str, message: str) -> None:
            issues.append(SpecIssue(path=path, message=message))

        if not spec.model:
            no("model", "required: a local path, a hub id or pypi:PACKAGE==VERSION/path")
        else:
            try:
                model_source.parse_ref(spec.model, Path("."))
            except ValueError as e:
                no("model", str(e))
        if spec.quantization != "none":
            no("quantization", f"{spec.quantization} is not supported by the transformers engine")
        if spec.speculative is not None:
            no("speculative", "speculative decoding is not supported by the transformers engine")
        if spec.endpoints:
            no("endpoints", "the transformers engine runs in process; it attaches to nothing")
        if spec.replicas != 1:
            no("replicas", "the transformers engine runs one in-process replica")
        if spec.task == "embed" and spec.lora is not None:
            no("lora", "an embedding model takes no adapters")
        if spec.engine_args:
            no("engine_args", "not used by the transformers engine (use options)")
        issues += options_issues(spec, LocalOptions)
        return issues

    @classmethod
    def prefetch(cls, spec: ModelSpec, ctx: EngineContext) -> str:
        """Fetch and convert the model into the cache without serving (`gateway pull`);
        returns where it is. Blocking."""
        if not spec.model:
            return "no model to fetch"
        return model_source.resolve(
            spec.model, config_dir=ctx.config_dir, cache_dir=ctx.cache_dir, progress=ctx.progress
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        assert self.spec.model is not None
        self._detail = "fetching the model"
        path = await asyncio.to_thread(_serialised, self._resolve)
        self._detail = "loading the model"
        t0 = time.monotonic()
        load = self._load_embedder if self.spec.task == "embed" else self._load_generator
        await asyncio.to_thread(_serialised, load, path)
        self.ctx.progress(f"{self.spec.name}: loaded {path} in {time.monotonic() - t0:.1f}s")
        if self.spec.lora is not None:
            for a in self.spec.lora.adapters:
                await self.load_adapter(a.name, str(self.ctx.config_dir / a.path))
        self._ready = True
        self._detail = ""

    def _resolve(self) -> str:
        assert self.spec.model is not None
        return model_source.resolve(
            self.spec.model,
            config_dir=self.ctx.config_dir,
            cache_dir=self.ctx.cache_dir,
            progress=self.ctx.progress,
        )

    async def stop(self) -> None:
        self._ready = False
        self._detail = "stopped"
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)
            self._batcher = None
        self._embedder = None

    def _setup_torch(self) -> Any:
        import torch

        if self._threads is not None:
            torch.set_num_threads(self._threads)
        else:
            # One CPU is left to the event loop. Measured with bench/embedded.py on a 2-core
            # EPYC (fp32, through HTTP, same run): 1 thread gave 5.3 / 13.7 tok/s at 1 / 8
            # streams, 2 threads 5.1 / 9.6. With every core in the OpenMP team, each time
            # the loop (or anything else) runs, a team member is descheduled and the rest
            # wait for it at every barrier of every op.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
        dev = self._device_opt
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(dev)
        dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }.get(self.spec.dtype)
        if dtype is None:  # auto
            native_bf16 = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
            dtype = torch.bfloat16 if native_bf16 else torch.float32
        return torch, device, dtype

    def _load_generator(self, path: str) -> None:
        torch, device, dtype = self._setup_torch()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engines.local.batcher import Batcher
        from engines.local.structured import Grammars
        from engines.local.text import token_bytes_fn

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        cfg = model.config
        self._context_len = min(
            self.spec.max_model_len, int(getattr(cfg, "max_position_embeddings", 1 << 30))
        )
        self._vocab = int(cfg.vocab_size)
        eos: set[int] = set()
        for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list):
                eos.update(int(x) for x in src)
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos, default=0)
        with torch.inference_mode():  # warm the kernels so the first request is not slow
            model(input_ids=torch.tensor([[pad, pad]], device=device))
        batching = self.spec.batching
        self._batcher = Batcher(
            model,
            eos_ids=eos,
            pad_id=int(pad),
            max_sequences=batching.max_sequences,
            max_batched_tokens=batching.max_batched_tokens or max(2048, self._context_len),
            device=device,
            name=self.spec.name,
        )
        self._tok = tok
        self._token_info = token_bytes_fn(tok)
        self._grammar_tok = Grammars(tok, self._vocab)  # ~1 s once, not on a first request
        self._template_tools = "tools" in str(getattr(tok, "chat_template", None) or "")
        self._batcher.start()

    def _load_embedder(self, path: str) -> None:
        _, device, _ = self._setup_torch()
        from engines.local.embed import Embedder

        self._embedder = Embedder(path, device)

    # ------------------------------------------------------------------ status

    def status(self) -> EngineStatus:
        b = self._batcher
        return EngineStatus(
            ready=self._ready,
            detail=self._detail,
            running=b.running if b else 0,
            waiting=b.waiting if b else 0,
            max_batch_seen=b.max_batch_seen if b else 0,
        )

    # ------------------------------------------------------------------ generate

    async def complete(self, req: GenerateRequest) -> Completed:
        job = self._submit(req)
        try:
            while job.pending:
                for i, ev in await job.next_events():
                    job.choices[i].absorb(ev)
        finally:
            job.cancel()
        usage = job.usage()
        assert self._token_info is not None
        body = shapes.completion_body(req, job.choices, usage, self._token_info)
        return Completed(body=orjson.dumps(body), usage=usage)

    async def stream(self, req: GenerateRequest) -> AsyncGenerator[bytes, None]:
        job = self._submit(req)
        chat = req.route == "chat"
        head = shapes.stream_head(req)
        info = self._token_info
        assert info is not None
        try:
            while job.pending:
                events = await job.next_events()
                out: list[bytes] = []
                for i, ev in events:
                    c = job.choices[i]
                    offset = c.offset
                    first = not c.started
                    c.absorb(ev)
                    out.extend(shapes.chunks_for(head, chat, c, ev, first, offset, info))
                if out:
                    yield b"".join(out)
            final = {**head, "choices": [], "usage": shapes.usage_obj(job.usage())}
            yield shapes.sse(final)
        finally:
            job.cancel()

    def _submit(self, req: GenerateRequest) -> _Job:
        from engines.local.batcher import Sequence
        from engines.local.prompts import plan_request
        from engines.local.structured import parse_structured, refuse_unsupported
        from engines.local.text import Detokenizer

        batcher, loop = self._batcher, self._loop
        if self.spec.task != "generate":
            raise InvalidRequest(
                f"model {req.model!r} is an embedding model; use /v1/embeddings", param="model"
            )
        if batcher is None or loop is None or not self._ready:
            raise EngineUnavailable(f"model {self.spec.name!r} is not ready")
        if req.adapter is not None and req.adapter not in self._adapters:
            raise AdapterError(f"adapter {req.adapter!r} is not loaded", param="model")
        chat = req.route == "chat"
        refuse_unsupported(req.body)
        st = parse_structured(req.body, chat=chat, template_has_tools=self._template_tools)
        plan = plan_request(
            self._tok,
            req.body,
            chat=chat,
            context_len=self._context_len,
            vocab=self._vocab,
            max_tokens_default=self.spec.max_tokens_default,
            messages=st.messages,
            tools=st.template_tools,
        )
        if batcher.waiting + plan.n * len(plan.prompts) > self._max_waiting:
            raise EngineOverloaded(f"{batcher.waiting} sequences already wait for a slot")
        choices: list[ChoiceState] = []
        seqs: list[Sequence] = []
        job = _Job(self, seqs, choices)
        put = job.queue.put_nowait
        for p, ids in enumerate(plan.prompts):
            echo_text = self._tok.decode(ids, skip_special_tokens=True) if plan.echo else ""
            for j in range(plan.n):
                index = p * plan.n + j
                params = plan.params(index, len(ids), self._context_len)
                if st.grammar is not None:
                    params.constraint = self._grammars().constraint(st.grammar)

                def sink(ev: SeqEvent, index: int = index) -> None:
                    loop.call_soon_threadsafe(put, (index, ev))

                seqs.append(Sequence(ids, params, sink, Detokenizer(self._tok, ids), req.adapter))
                choices.append(
                    ChoiceState(
                        index,
                        p,
                        echo=echo_text,
                        tool_mode=st.tool_mode,
                        tools=st.tools,
                        holding={"call": True, "auto": None}.get(st.tool_mode or "", False),
                    )
                )
        job.prompt_tokens = sum(len(ids) for ids in plan.prompts)
        job.pending = len(seqs)
        batcher.submit(seqs)
        return job

    def _grammars(self) -> Grammars:
        assert self._grammar_tok is not None
        return self._grammar_tok

    # ------------------------------------------------------------------ tokenize

    def _tokenizer(self) -> Any:
        if self.spec.task != "generate":
            raise InvalidRequest(
                f"The model `{self.spec.name}` is an embedding model; /tokenize serves "
                "generate models.",
                param="model",
            )
        if self._tok is None or not self._ready:
            raise EngineUnavailable(f"model {self.spec.name!r} is not ready")
        return self._tok

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        from engines.local.tokens import tokenize

        return tokenize(self._tokenizer(), body, self._context_len)

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        from engines.local.tokens import detokenize

        return detokenize(self._tokenizer(), body, self._vocab)

    # ------------------------------------------------------------------ embed

    async def embed(self, req: EmbedRequest) -> Completed:
        emb = self._embedder
        if self.spec.task != "embed":
            raise InvalidRequest(
                f"model {req.model!r} generates text; it does not serve embeddings", param="model"
            )
        if emb is None or not self._ready:
            raise EngineUnavailable(f"model {self.spec.name!r} is not ready")
        dims = req.body.get("dimensions")
        if dims is not None and int(dims) != emb.dimensions:
            raise InvalidRequest(
                f"this model's embeddings have {emb.dimensions} dimensions and cannot be "
                f"shortened to {dims}",
                param="dimensions",
            )
        fmt = req.body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise InvalidRequest("encoding_format must be float or base64", param="encoding_format")
        if not req.inputs:
            raise InvalidRequest("input must not be empty", param="input")
        ids = emb.tokenize(req.inputs)
        vectors = await asyncio.to_thread(emb.embed, ids)
        data: list[Any] = []
        for i in range(vectors.shape[0]):
            row = vectors[i]
            if fmt == "base64":
                data.append(base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii"))
            else:
                data.append(row.tolist())
        n_tokens = sum(len(x) for x in ids)
        body = shapes.embeddings_body(req.model, data, n_tokens)
        return Completed(body=orjson.dumps(body), usage=Usage(prompt_tokens=n_tokens))

    # ------------------------------------------------------------------ adapters

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def load_adapter(self, name: str, path: str) -> None:
        batcher = self._batcher
        if self.spec.task != "generate" or batcher is None:
            raise AdapterError("this model takes no adapters", param="model")
        lora = self.spec.lora
        if lora is None:
            raise AdapterError(f"model {self.spec.name!r} has no lora section", param="model")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already loaded", param="lora_name")
        if len(self._adapters) >= lora.max_adapters:
            raise AdapterError(
                f"{len(self._adapters)} adapters loaded; max_adapters is {lora.max_adapters}",
                param="lora_name",
            )
        cfg_path = Path(path) / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot read {cfg_path}: {e}", param="lora_path") from e
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterError(
                f"adapter {name!r} is {cfg.get('peft_type')}, not LoRA", param="lora_path"
            )
        rank = int(cfg.get("r", 0))
        if rank > lora.max_rank:
            raise AdapterError(
                f"adapter {name!r} has rank {rank}; max_rank is {lora.max_rank}", param="lora_path"
            )

        def load() -> None:
            from peft import PeftModel

            if not batcher.peft:
                batcher.model = PeftModel.from_pretrained(batcher.model, path, adapter_name=name)
                batcher.peft = True
            else:
                batcher.model.load_adapter(path, adapter_name=name)
            batcher.model.eval()

        try:
            await asyncio.wrap_future(batcher.call(load))
        except ServingError:
            raise
        except Exception as e:
            raise AdapterError(f"cannot load adapter {name!r}: {e}", param="lora_path") from e
        self._adapters[name] = path
        self.ctx.progress(f"{self.spec.name}: adapter {name} loaded from {path}")

    async def unload_adapter(self, name: str) -> None:
        batcher = self._batcher
        if name not in self._adapters or batcher is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded", param="lora_name")
        # New requests for it are refused from now on; running ones finish first.
        del self._adapters[name]
        last = not self._adapters

        def unload() -> None:
            if last:  # back to the bare model: no PEFT hooks on the hot path
                batcher.model = batcher.model.unload()
                batcher.peft = False
            else:
                batcher.model.delete_adapter(name)

        await asyncio.wrap_future(
            batcher.call(unload, ready=lambda: not batcher.uses_adapter(name))
        )
        self.ctx.progress(f"{self.spec.name}: adapter {name} unloaded")


# transformers imports its classes lazily and that import is not thread-safe: two models
# fetching, converting or loading at once in worker threads can see "cannot import name
# 'AutoModel'". Starts are short next to a gateway's life, so they take turns.
_LOAD_LOCK = threading.Lock()
_T = TypeVar("_T")


def _serialised(fn: Callable[..., _T], *args: Any) -> _T:
    with _LOAD_LOCK:
        return fn(*args)
