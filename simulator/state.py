"""What one simulator holds while it runs: counters, capacity queue, adapters, draws.

Owns `SimState` (`running` / `waiting`, the `/metrics` and `/v1/models` bodies, the latency
and fault draws, the open connections, the output text and finding where a prompt
continues it) and `Slots` (vLLM's running limit with a FIFO
waiting queue). Does not own the socket (`simulator.server`), the wire protocol
(`simulator.connection`) or what a request answers (`simulator.behaviour`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import time
from collections import deque
from dataclasses import replace
from typing import Any

import orjson

from simulator.config import FINGERPRINT, SimConfig
from simulator.costs import PrefixCache
from simulator.kv_events import KVEventPublisher
from simulator.tokens import Vocab


class Slots:
    """The running-sequence limit with a FIFO queue behind it (vLLM's waiting queue)."""

    __slots__ = ("limit", "running", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        if self.limit == 0 or (self.running < self.limit and not self.waiters):
            self.running += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted and cancelled in the same tick: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            raise

    def release(self) -> None:
        self.running -= 1
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)
                break


class SimState:
    """One simulator's state. `running`, `waiting` and `adapters` expose the same figures
    as `/metrics` and `/v1/models`."""

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or SimConfig(), **overrides)
        c = self.config
        self._rng = random.Random(c.seed)
        self._slots = Slots(c.max_running)
        self._server: asyncio.base_events.Server | None = None
        # Open client connections (closed at stop); typed loosely to keep this module
        # free of the protocol's import.
        self._conns: set[Any] = set()
        self.adapters: dict[str, str] = dict(c.lora_modules)
        self.url = ""
        self._started_at = 0.0
        self._created = int(time.time())
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex().encode()
        # Precomputed token texts: JSON-encoded for chunks, plain for whole responses.
        self._tokens = [" " + w for w in c.words]
        self.tok_json = [orjson.dumps(t) for t in self._tokens]
        self._text_cache: dict[tuple[int, int], str] = {}
        # /tokenize's ids back to words for /detokenize (bounded).
        self.vocab = Vocab(c.words)
        # Continuing its own text (`continued_from`): the first token, the length of
        # text(0, j) → j for one cycle of the words, and that whole cycle.
        self._first_token = self._tokens[0]
        self._cycle = self.text(0, len(self._tokens))
        self._tail_lengths = {len(self.text(0, j)): j for j in range(len(self._tokens), 0, -1)}
        self._model_json: dict[str, bytes] = {}
        self._auth = b"Bearer " + c.api_key.encode() if c.api_key else None
        self._zero_latency = c.ttft_ms == 0 and c.itl_ms == 0 and c.prefill_ms_per_token == 0
        self._faulty = bool(c.error_rate or c.stall_ms or c.drop_after is not None)
        # vLLM's KV-cache events of the prefix cache, when asked for (sockets bound at start).
        self.kv_events = (
            KVEventPublisher(c.kv_events_port, c.kv_events_drop_rate, c.seed)
            if c.kv_events_port is not None
            else None
        )
        self.prefix_cache = (
            PrefixCache(
                c.prefix_cache_tokens,
                self.kv_events.publish if self.kv_events is not None else None,
            )
            if c.prefix_cache_tokens
            else None
        )
        self.adapter_loads = 0
        # Metrics.
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec_drafts_total = 0
        self.spec_draft_tokens_total = 0
        self.spec_accepted_total = 0
        self.requests_total = 0
        # Tokens generated for a streamed request whose client left before they were sent
        # (held for the next multi-token delta): in the generation counter, never on the
        # wire. A simulator figure, not vLLM's: it tells a relay's own loss from this one.
        self.unsent_tokens_total = 0
        # Generation requests received (answered, failed by a fault, or cut): attempts.
        self.received_total = 0
        # GET /health and GET /metrics received (how often the gateway probes and scrapes).
        self.probes_total = 0
        self.scrapes_total = 0
        # The W3C `traceparent` headers received, newest last (bounded): what vLLM would
        # parent its own spans to, for tests of trace propagation.
        self.traceparents: deque[str] = deque(maxlen=1024)
        self._kv_tokens = 0

    def reconfigure(self, **changes: Any) -> None:
        """Change knobs while serving (tests turn faults on and off): latency, faults and
        startup; capacity, words and adapters keep their start values."""
        self.config = c = replace(self.config, **changes)
        self._zero_latency = c.ttft_ms == 0 and c.itl_ms == 0 and c.prefill_ms_per_token == 0
        self._faulty = bool(c.error_rate or c.stall_ms or c.drop_after is not None)
        if self.kv_events is not None:
            self.kv_events.drop_rate = c.kv_events_drop_rate

    @property
    def running(self) -> int:
        return self._slots.running

    @property
    def waiting(self) -> int:
        return len(self._slots.waiters)

    # ---- helpers used by connections

    def _starting(self) -> bool:
        c = self.config
        return bool(c.startup_s) and (
            asyncio.get_running_loop().time() - self._started_at < c.startup_s
        )

    def _draw(self, base_s: float) -> float:
        c = self.config
        if base_s <= 0 or c.jitter == 0:
            return base_s
        if c.jitter_dist == "uniform":
            return base_s * self._rng.uniform(max(0.0, 1 - c.jitter), 1 + c.jitter)
        return base_s * self._rng.lognormvariate(0.0, c.jitter)

    def _hit(self, rate: float) -> bool:
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)

    def text(self, offset: int, n: int) -> str:
        key = (offset, n)
        text = self._text_cache.get(key)
        if text is None:
            toks, w = self._tokens, len(self._tokens)
            text = "".join(toks[(offset + k) % w] for k in range(n))
            if len(self._text_cache) < 4096:
                self._text_cache[key] = text
        return text

    def continued_from(self, text: str) -> int:
        """k when `text` ends with text(0, k), this simulator's own answer so far (a greedy
        model given its partial answer continues it), else 0. One `rfind` of the first
        token and one dict lookup for a prompt that is no such text (the hot path)."""
        pos = text.rfind(self._first_token)
        if pos < 0:
            return 0
        j = self._tail_lengths.get(len(text) - pos)
        if j is None or not text.endswith(self.text(0, j)):
            return 0
        # Whole cycles of the words before the last one.
        cycle, w = self._cycle, len(self._tokens)
        while pos >= len(cycle) and text.startswith(cycle, pos - len(cycle)):
            pos -= len(cycle)
            j += w
        return j

    def mjson(self, model: str) -> bytes:
        b = self._model_json.get(model)
        if b is None:
            b = self._model_json[model] = orjson.dumps(model)
        return b

    def error_body(self, status: int, message: str, err_type: str) -> bytes:
        if self.config.legacy_errors:
            return orjson.dumps(
                {
                    "object": "error",
                    "message": message,
                    "type": err_type,
                    "param": None,
                    "code": status,
                }
            )
        return orjson.dumps(
            {"error": {"message": message, "type": err_type, "param": None, "code": status}}
        )

    def metrics_text(self) -> bytes:
        model = self.config.model.replace('"', '\\"')
        labels = f'{{model_name="{model}",engine="0"}}'
        kv = min(1.0, self._kv_tokens / self.config.kv_cache_tokens)
        rows: list[tuple[str, str, float]] = [
            ("vllm:num_requests_running", "gauge", self.running),
            ("vllm:num_requests_waiting", "gauge", self.waiting),
            ("vllm:kv_cache_usage_perc", "gauge", kv),
            ("vllm:prompt_tokens_total", "counter", self.prompt_tokens_total),
            ("vllm:generation_tokens_total", "counter", self.generation_tokens_total),
            ("vllm:request_success_total", "counter", self.requests_total),
        ]
        if self.config.metrics_family == "lmdeploy":
            # LMDeploy 0.18's load gauges (lmdeploy/metrics/loggers.py); this simulator has
            # no API-server queue ahead of its scheduler, so that one stays 0.
            rows[:3] = [
                ("lmdeploy:num_requests_running", "gauge", self.running),
                ("lmdeploy:num_requests_waiting", "gauge", self.waiting),
                ("lmdeploy:num_api_requests_waiting", "gauge", 0),
                ("lmdeploy:gpu_cache_usage_perc", "gauge", kv),
            ]
        if self.prefix_cache is not None:
            rows += [
                ("vllm:prefix_cache_queries_total", "counter", self.prefix_cache.query_tokens),
                ("vllm:prefix_cache_hits_total", "counter", self.prefix_cache.hit_tokens),
            ]
        if self.config.spec_tokens:
            rows += [
                ("vllm:spec_decode_num_drafts_total", "counter", self.spec_drafts_total),
                (
                    "vllm:spec_decode_num_draft_tokens_total",
                    "counter",
                    self.spec_draft_tokens_total,
                ),
                ("vllm:spec_decode_num_accepted_tokens_total", "counter", self.spec_accepted_total),
            ]
        rows.append(("gateway_sim:unsent_tokens_total", "counter", self.unsent_tokens_total))
        lines = ["# simulator: gateway-sim (not a real vLLM)"]
        for name, kind, value in rows:
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{labels} {float(value)}")
        return ("\n".join(lines) + "\n").encode()

    def models_body(self) -> bytes:
        c = self.config
        data: list[dict[str, Any]] = [
            {
                "id": c.model,
                "object": "model",
                "created": self._created,
                "owned_by": FINGERPRINT,
                "root": c.model,
                "parent": None,
                "max_model_len": c.max_model_len,
                "permission": [],
            }
        ]
        for name, path in self.adapters.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self._created,
                    "owned_by": FINGERPRINT,
                    "root": path,
                    "parent": c.model,
                    "max_model_len": None,
                    "permission": [],
                }
            )
        return orjson.dumps({"object": "list", "data": data})

    def count_spec(self, n_out: int) -> None:
        k = self.config.spec_tokens
        if not k or n_out <= 0:
            return
        # Each verification step proposes k tokens and emits accepted + 1.
        per_step = 1 + k * self.config.spec_acceptance
        steps = max(1, math.ceil(n_out / per_step))
        self.spec_drafts_total += steps
        self.spec_draft_tokens_total += steps * k
        self.spec_accepted_total += max(0, min(steps * k, n_out - steps))

    def new_id(self, header_id: bytes | None) -> bytes:
        return header_id or b"%s%x" % (self._id_prefix, next(self._ids))
