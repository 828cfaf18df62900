"""The embedded engine's continuous batcher: one decode thread over one in-process model.

Owns: the running batch and its KV cache, admission of waiting sequences between decode
steps, per-sequence sampling (penalties, logit_bias and the grammar mask of
`engines.local.structured.Constraint`, then greedy / temperature / top-p / seeded
generator), logprobs, EOS / max-tokens / stop-string / grammar-complete endings,
cancellation, and model mutations (LoRA adapters) serialised between steps. Talks to the
outside through thread-safe `submit` / `cancel` / `call` and a per-sequence `sink`
callback invoked on the decode thread. Does not own the OpenAI wire format
(`engines.local.shapes`), prompt building and sampling parameters
(`engines.local.prompts`), asyncio (`engines.local.engine`), nor text handling
(`engines.local.text`).

Why hand-written rather than transformers' own continuous batching (`init_continuous_batching`,
looked at in 5.24): its sampling configuration and seed are global to the manager (no
per-request seed, greedy and sampled requests cannot share it), it returns only the chosen
token's logprob (no top-k), and it has no per-request LoRA adapter. The scheme here is the
classic one for a small model on CPU:

- the batch keeps one left-padded KV cache (a `DynamicCache` of `engines.local.kvcache`
  layers: [B, heads, T, d] with room to spare along T, written in place each step) and a
  [B, T] attention mask; every row holds its real tokens right-aligned;
- each loop iteration first admits waiting sequences (one padded prefill forward for all of
  them, bounded by `max_batched_tokens`), merges their cache rows into the batch (padding
  the shorter side on the left), then runs one decode forward over every running row;
- finished or cancelled rows are dropped with `index_select` and all-padding columns on the
  left are trimmed, so the batch never pays for sequences that left;
- LoRA: one forward serves rows of different adapters through PEFT's mixed-adapter batches
  (`adapter_names=[...]`, `"__base__"` for the base model).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from engines.base import EngineUnavailable, ServingError
from engines.local.kvcache import new_cache, pad_left
from engines.local.prompts import SamplingParams
from engines.local.text import Detokenizer, StopMatcher

__all__ = [
    "Batcher",
    "SamplingParams",
    "SeqEvent",
    "Sequence",
    "TokenLogprob",
]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class SeqEvent:
    """What one sequence produced in one step (delivered on the decode thread)."""

    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: BaseException | None = None


Sink = Callable[[SeqEvent], None]


class Sequence:
    """One generated choice. Created by the engine, mutated only by the decode thread
    (except `cancelled`, a flag any thread may set)."""

    __slots__ = (
        "adapter",
        "cancelled",
        "detok",
        "done",
        "generator",
        "out_ids",
        "params",
        "pos",
        "prompt_ids",
        "sink",
        "stop",
    )

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        detok: Detokenizer,
        adapter: str | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.detok = detok
        self.adapter = adapter
        self.stop = StopMatcher(params.stop)
        self.generator: torch.Generator | None = None
        self.out_ids: list[int] = []
        self.pos = 0  # real tokens in the KV cache = position id of the next input
        self.cancelled = False
        self.done = False


@dataclass(slots=True)
class _Control:
    fn: Callable[[], Any]
    future: Future[Any]
    ready: Callable[[], bool] | None = None


class Batcher:
    """The decode loop. `model` is a causal LM (or a PEFT wrapper set via `set_model`)."""

    def __init__(
        self,
        model: Any,
        *,
        eos_ids: set[int],
        pad_id: int,
        max_sequences: int,
        max_batched_tokens: int,
        device: torch.device,
        name: str = "local",
    ) -> None:
        self.model = model
        self.peft = False  # True once the model is a PeftModel (forward takes adapter_names)
        self._eos = eos_ids
        self._pad = pad_id
        self._max_seqs = max_sequences
        self._max_tokens = max_batched_tokens
        self._device = device
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._control: list[_Control] = []
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._stopping = False
        self.max_batch_seen = 0
        self.steps = 0
        self.step_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        # A finished row is dropped right after its step; `done` is set before its last
        # event is sent, so nobody sees a finished stream still counted. A cancelled row
        # counts until the decode thread actually drops it.
        return sum(1 for s in self._rows if not s.done)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if self._stopping:
                raise EngineUnavailable("the engine is stopping")
            self._waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Make the sequences leave at the next step boundary (or never start)."""
        for s in seqs:
            s.cancelled = True
        with self._cv:
            self._cv.notify()

    def call(self, fn: Callable[[], Any], ready: Callable[[], bool] | None = None) -> Future[Any]:
        """Run `fn` on the decode thread between two steps, once `ready()` holds (checked
        there, between steps). For model mutations such as loading an adapter."""
        fut: Future[Any] = Future()
        with self._cv:
            if self._stopping:
                raise EngineUnavailable("the engine is stopping")
            self._control.append(_Control(fn, fut, ready))
            self._cv.notify()
        return fut

    def uses_adapter(self, name: str) -> bool:
        return any(s.adapter == name for s in (*self._rows, *self._waiting) if not s.cancelled)

    # ------------------------------------------------------------------ decode thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (
                        self._stopping or self._waiting or self._rows or self._control_ready()
                    ):
                        self._cv.wait()
                    if self._stopping:
                        break
                    controls = [c for c in self._control if c.ready is None or c.ready()]
                    self._control = [c for c in self._control if c not in controls]
                    admitted = self._admit_locked()
                for c in controls:
                    try:
                        c.future.set_result(c.fn())
                    except BaseException as e:  # handed to the caller, the loop goes on
                        c.future.set_exception(e)
                self._step(admitted)
        self._shutdown()

    def _control_ready(self) -> bool:
        return any(c.ready is None or c.ready() for c in self._control)

    def _admit_locked(self) -> list[Sequence]:
        room = self._max_seqs - sum(1 for s in self._rows if not (s.cancelled or s.done))
        budget = self._max_tokens
        out: list[Sequence] = []
        while self._waiting and len(out) < room:
            s = self._waiting[0]
            if s.cancelled:
                self._waiting.popleft()
                continue
            if out and len(s.prompt_ids) > budget:
                break  # next step: keep one prefill's latency bounded
            self._waiting.popleft()
            budget -= len(s.prompt_ids)
            out.append(s)
        return out

    def _step(self, admitted: list[Sequence]) -> None:
        t0 = time.perf_counter()
        try:
            self._drop_finished()
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._decode()
        except Exception as e:  # a failed forward fails its batch, not the engine
            err = e if isinstance(e, ServingError) else ServingError(f"generation failed: {e!r}")
            for s in (*self._rows, *admitted):
                if not s.done:
                    s.done = True
                    s.sink(SeqEvent(error=err))
            self._rows, self._cache, self._mask = [], None, None
        self.step_seconds += time.perf_counter() - t0

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache,
        rows: list[Sequence],
    ) -> torch.Tensor:
        kw: dict[str, Any] = {}
        if self.peft:
            kw["adapter_names"] = [s.adapter or BASE_ADAPTER for s in rows]
        out = self.model(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=pos.to(self._device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **kw,
        )
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        self.steps += 1
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _prefill(self, seqs: list[Sequence]) -> None:
        n = len(seqs)
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            k = len(s.prompt_ids)
            ids[i, width - k :] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[i, width - k :] = 1
            s.pos = k
            seed = s.params.seed if s.params.seed is not None else random.getrandbits(63)
            s.generator = torch.Generator(device="cpu").manual_seed(seed)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        logits = self._forward(ids, mask, pos, cache, seqs)
        self._merge(seqs, cache, mask.to(self._device))
        self._sample_and_emit(logits, seqs)
        self._drop_finished()

    def _decode(self) -> None:
        rows = self._rows
        assert self._mask is not None and self._cache is not None
        ids = torch.tensor([[s.out_ids[-1]] for s in rows], dtype=torch.long)
        pos = torch.tensor([[s.pos] for s in rows], dtype=torch.long)
        ones = torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        logits = self._forward(ids, self._mask, pos, self._cache, rows)
        for s in rows:
            s.pos += 1
        self._sample_and_emit(logits, rows)
        self._drop_finished()

    # -------------------------------------------------------------- cache surgery

    def _merge(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None or not self._rows:
            self._rows, self._cache, self._mask = list(seqs), cache, mask
            return
        old_w, new_w = self._mask.shape[1], mask.shape[1]
        width = max(old_w, new_w)
        old_layers: list[Any] = self._cache.layers
        new_layers: list[Any] = cache.layers
        for old, new in zip(old_layers, new_layers, strict=True):
            old_k, old_v = old.keys, old.values
            new_k, new_v = new.keys, new.values
            old.replace(
                torch.cat([pad_left(old_k, width, -2), pad_left(new_k, width, -2)]),
                torch.cat([pad_left(old_v, width, -2), pad_left(new_v, width, -2)]),
            )
        self._mask = torch.cat([pad_left(self._mask, width, 1), pad_left(mask, width, 1)])
        self._rows = self._rows + list(seqs)

    def _drop_finished(self) -> None:
        rows = self._rows
        keep = [i for i, s in enumerate(rows) if not (s.done or s.cancelled)]
        if len(keep) == len(rows):
            return
        if not keep or self._cache is None or self._mask is None:
            self._rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, idx)
        # Columns that are padding in every remaining row are dead weight: trim them.
        first = int(mask.any(dim=0).int().argmax())
        mask = mask[:, first:]
        layers: list[Any] = self._cache.layers
        for layer in layers:
            layer.replace(
                layer.keys.index_select(0, idx)[:, :, first:],
                layer.values.index_select(0, idx)[:, :, first:],
            )
        self._mask = mask
        self._rows = [rows[i] for i in keep]

    # ------------------------------------------------------------------ sampling

    def _sample_and_emit(self, logits: torch.Tensor, rows: list[Sequence]) -> None:
        for i, s in enumerate(rows):
            p = s.params
            if (
                p.constraint is not None
                or p.logit_bias
                or p.presence_penalty
                or p.frequency_penalty
            ):
                _adjust_row(logits, i, s)
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        sampled = [i for i, s in enumerate(rows) if s.params.temperature > 0 and not s.cancelled]
        if sampled:
            idx = torch.tensor(sampled, dtype=torch.long, device=logits.device)
            temps = torch.tensor(
                [rows[i].params.temperature for i in sampled], device=logits.device
            )
            scaled = logits.index_select(0, idx) / temps.unsqueeze(1)
            top_ps = [rows[i].params.top_p for i in sampled]
            if min(top_ps) < 1.0:
                scaled = _top_p_filter(scaled, torch.tensor(top_ps, device=logits.device))
            probs = scaled.softmax(dim=-1).cpu()
            for j, i in enumerate(sampled):
                gen = rows[i].generator
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=gen).item())
        logp: torch.Tensor | None = None
        if any(s.params.logprobs is not None for s in rows):
            logp = logits.log_softmax(dim=-1).cpu()
        for i, s in enumerate(rows):
            if s.cancelled or s.done:
                continue
            lps: list[TokenLogprob] | None = None
            k = s.params.logprobs
            if k is not None and logp is not None:
                top: list[tuple[int, float]] = []
                if k > 0:
                    vals, ids = logp[i].topk(k)
                    top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                lps = [TokenLogprob(tokens[i], float(logp[i, tokens[i]]), top)]
            self._emit(s, tokens[i], lps)

    def _emit(self, s: Sequence, token: int, lps: list[TokenLogprob] | None) -> None:
        s.out_ids.append(token)
        p = s.params
        text = s.stop.feed(s.detok.add(token))
        finish: str | None = None
        grammar_done = False
        if p.constraint is not None:
            p.constraint.advance(token)
            grammar_done = p.constraint.finished
        if s.stop.stopped or grammar_done or (token in self._eos and not p.ignore_eos):
            finish = "stop"
        elif len(s.out_ids) >= p.max_new_tokens:
            finish = "length"
        if finish is not None and not s.stop.stopped:
            text += s.stop.feed(s.detok.flush())
            if s.stop.stopped:
                finish = "stop"
            else:
                text += s.stop.flush()
        if finish is not None:
            s.done = True
        if text or finish or lps:
            s.sink(SeqEvent(text, lps, finish, len(s.out_ids)))

    def _shutdown(self) -> None:
        err = EngineUnavailable("the engine stopped")
        with self._cv:
            pending = list(self._waiting) + self._rows
            self._waiting.clear()
            controls, self._control = self._control, []
        for s in pending:
            if not s.done:
                s.done = True
                with contextlib.suppress(Exception):
                    s.sink(SeqEvent(error=err))
        for c in controls:
            c.future.set_exception(err)
        self._rows, self._cache, self._mask = [], None, None


def _adjust_row(logits: torch.Tensor, i: int, s: Sequence) -> None:
    """Penalties, logit_bias and the grammar mask on row `i`, in OpenAI's order."""
    p = s.params
    row = logits[i]
    if (p.presence_penalty or p.frequency_penalty) and s.out_ids:
        ids = torch.tensor(s.out_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(ids, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
    if p.logit_bias:
        idx = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
        row.index_add_(0, idx, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype))
    if p.constraint is not None:
        allowed = p.constraint.allowed().to(row.device)
        if bool(allowed.any()):
            row.masked_fill_(~allowed[: row.shape[0]], float("-inf"))


def _top_p_filter(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter per row: keep the smallest set of tokens whose mass reaches top_p."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    drop = before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
