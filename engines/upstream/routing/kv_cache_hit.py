"""Scorer `kv_cache_hit`: send a request to the worker that holds most of its prompt in its
KV cache, as the workers' own KV-cache events say (vLLM `--kv-events-config`, the
simulator's `--kv-events-port`), with load bounded so one hot prefix cannot pin one worker.

    blocks   = the gateway's keys of the prompt's full blocks (`kv_tokens` → `kv_blocks`:
               the model's tokenizer and chat template, LoRA name and cache_salt keyed as
               vLLM keys them)
    held(e)  = leading blocks e holds (`kv_index`)
    busy     = ceil(c × (total outstanding + 1) / n)               c = routing.load_factor
    share    = c × max(least picks, mean picks / c, 8) + 1         picks: this scorer's
                                                                    recent choices, halved
                                                                    every 256 × n
    eligible = the endpoints under both bounds (all when none is)
    pick     = the eligible endpoint with the most held blocks, then the fewest
               outstanding, then the fewest picks

The two bounds are those of `hashring` (its docstring says why both: the in-flight bound
acts only when workers are busy; the share bound keeps a worker that holds many prefixes
from taking a multiple of the others' requests). A prefix nobody holds goes to the least
loaded, least picked worker, so new prefixes spread; every request goes by load while no
worker publishes (a worker that publishes nothing never holds anything). The picked
worker's blocks count as held at once (`KVIndex.expect`) until its own events confirm
them, or for 5 s: a burst of one new prefix then finds the worker it was first sent to
(only for a worker whose events have been heard; the first 32 new blocks).

Weigh it above the load scorers together, e.g. `{kv_cache_hit: 2, least_outstanding: 1}`:
it then decides alone (the router's one-hot short cut, `owner`). With a lower weight its
scores join the weighted sum: hit(e) = held(e) / len(blocks) for an eligible endpoint, 0
for one over a bound (no expectations are recorded on that path: the pick is not its own).

Owns the per-model machinery the score needs, started and stopped with the engine: the
index, one subscriber per worker (`kv_events`), the tokenizer, and the thread long prompts
are tokenized in (a prompt of more than `routing.kv_events.thread_above_chars`
characters, so an 8k-token chat template render never blocks the event loop; shorter ones
cost less than the hop to a thread). Decisions it makes are counted as `kv_cache_hit`, or
`bounded_load_overflow` when the best holder was over the bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq.asyncio

from engines.spec import ModelSpec, RoutingSpec, SpecIssue
from engines.upstream.endpoints import Endpoint, base_url
from engines.upstream.routing.base import RoutingRequest
from engines.upstream.routing.kv_blocks import extra_seed
from engines.upstream.routing.kv_events import EventSource, Subscriber
from engines.upstream.routing.kv_index import KVIndex
from engines.upstream.routing.kv_tokens import TOKENIZERS, HFTokens, Tokenizer, prompt_chars

__all__ = ["KVCacheHitScorer", "attach_sources", "kv_events_issues"]

log = logging.getLogger("engines.upstream.kv_cache_hit")

# The share bound: picks are halved every _WINDOW × (endpoints) picks, and the bound never
# falls below load_factor × _FLOOR + 1 (a fresh fleet keeps its hits).
_WINDOW = 256
_FLOOR = 8.0
# How long a request's blocks count as held by the worker it was sent to before that
# worker's events confirm them (`KVIndex.expect`): the events come at its next scheduler
# step once the prompt is prefilled, later when it queues.
_EXPECT_S = 5.0
# Of a request's blocks beyond what its worker holds, the first this many are expected:
# enough for the next request with the same new prefix to find that worker, at a bounded
# cost on the decision path (measured 100 / 176 µs p50 / p99 to expect all 512 blocks of an
# 8k-token prompt on the 2-core dev box, against a 200 µs budget for the whole decision).
_EXPECT_BLOCKS = 32


class KVCacheHitScorer:
    name = "kv_cache_hit"
    needs = "tokens"

    def __init__(self) -> None:
        self.load_factor = 1.25
        self.tokenizer_kind = "hf"
        self.tokenizer_given: str | None = None
        self.tokenizer_path: str | None = None
        self.thread_above_chars = 2048
        self.index = KVIndex()
        self.spilled = False
        self.hit = False
        # Recent picks per endpoint (halved every _WINDOW × endpoints picks): the share bound.
        self._picks: dict[Endpoint, float] = {}
        self._n = 0
        self._slots: dict[Endpoint, int] = {}
        self._subs: list[Subscriber] = []
        self._by_slot: dict[int, Subscriber] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._tokenizer: Tokenizer | None = None
        self.threaded = 0
        self.untokenized = 0

    def configure(self, routing: RoutingSpec) -> None:
        kv = routing.kv_events
        self.load_factor = routing.load_factor
        self.tokenizer_given = kv.tokenizer
        self.tokenizer_kind = kv.tokenizer or self.tokenizer_kind
        self.tokenizer_path = kv.tokenizer_path
        self.thread_above_chars = kv.thread_above_chars
        self.index = KVIndex(max_blocks=kv.max_blocks)

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self,
        endpoints: Sequence[Endpoint],
        sources: Sequence[EventSource | None],
        model_path: str | None = None,
        tokenizer: str = "hf",
    ) -> None:
        """Index these endpoints (slot = position) from their sources (None: that worker
        publishes nothing and never scores a hit); `tokenizer` is the engine's default,
        used unless models.yaml names one."""
        if self.tokenizer_given is None:
            self.tokenizer_kind = tokenizer
        self._slots = {e: i for i, e in enumerate(endpoints)}
        self._tokenizer = TOKENIZERS[self.tokenizer_kind](self.tokenizer_path or model_path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-tokenize")
        if isinstance(self._tokenizer, HFTokens):
            # Read the tokenizer files once, off the event loop.
            await asyncio.get_running_loop().run_in_executor(self._pool, self._tokenizer.load)
        self._ctx = zmq.asyncio.Context()
        for slot, source in enumerate(sources):
            if source is None:
                continue
            sub = Subscriber(
                self._ctx,
                source,
                functools.partial(self.index.apply, slot),
                functools.partial(self.index.clear, slot),
            )
            sub.start()
            self._subs.append(sub)
            self._by_slot[slot] = sub

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        self._by_slot = {}
        for sub in subs:
            await sub.stop()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ the request's blocks

    def block_keys(self, route: str, body: dict[str, Any], adapter: str | None) -> list[int]:
        """The request's block keys (empty when its body cannot be tokenized)."""
        tok = self._tokenizer
        ids = tok.ids(route, body) if tok is not None else None
        if ids is None:
            self.untokenized += 1
            return []
        # vLLM's extra keys of a sequence's first block: the LoRA name, then cache_salt.
        extra: tuple[str, ...] = (adapter,) if adapter else ()
        salt = body.get("cache_salt")
        if isinstance(salt, str) and salt:
            extra += (salt,)
        return self.index.hasher.keys(ids, extra_seed(extra))

    async def with_blocks(
        self, rreq: RoutingRequest, route: str, body: dict[str, Any], adapter: str | None
    ) -> RoutingRequest:
        """`rreq` with the request's block keys: tokenized here, or in the thread when the
        prompt is long."""
        tok = self._tokenizer
        if (
            tok is not None
            and tok.offload
            and self._pool is not None
            and prompt_chars(body) > self.thread_above_chars
        ):
            self.threaded += 1
            loop = asyncio.get_running_loop()
            keys = await loop.run_in_executor(self._pool, self.block_keys, route, body, adapter)
        else:
            keys = self.block_keys(route, body, adapter)
        return dataclasses.replace(rreq, blocks=keys)

    # ------------------------------------------------------------------ scoring

    def _held(self, candidates: Sequence[Endpoint], keys: list[int]) -> list[int]:
        """Leading blocks of `keys` each candidate holds (0 for one not indexed)."""
        slots = [self._slots.get(e, -1) for e in candidates]
        known = [s for s in slots if s >= 0]
        got = dict(zip(known, self.index.match(keys, known), strict=True))
        return [got.get(s, 0) for s in slots]

    def _bounds(self, candidates: Sequence[Endpoint]) -> tuple[int, float]:
        """(in-flight bound, share bound) now (module docstring)."""
        c, m = self.load_factor, len(candidates)
        busy = math.ceil(c * (sum([e.outstanding for e in candidates]) + 1) / m)
        get = self._picks.get
        counts = [get(e, 0.0) for e in candidates]
        share = c * max(min(counts), sum(counts) / (m * c), _FLOOR) + 1.0
        return busy, share

    def owner(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> Endpoint | None:
        """The endpoint for this request (module docstring), counted as picked: the
        router's short cut when this scorer outweighs all others together."""
        keys = request.blocks
        held = (
            self._held(candidates, keys) if keys and self.index.holders else [0] * len(candidates)
        )
        busy, share = self._bounds(candidates)
        picks = self._picks
        best: Endpoint | None = None
        rank: tuple[int, int, float] = (-1, 0, 0.0)
        over = 0
        for e, h in zip(candidates, held, strict=True):
            p = picks.get(e, 0.0)
            if e.outstanding >= busy or p >= share:
                over = max(over, h)
                continue
            r = (h, -e.outstanding, -p)
            if r > rank:
                best, rank = e, r
        if best is None:  # every one over a bound: the least busy
            best = min(candidates, key=lambda e: (e.outstanding, picks.get(e, 0.0)))
            rank = (held[candidates.index(best)], 0, 0.0)
        self.spilled = over > rank[0]
        self.hit = rank[0] > 0
        self._count(best, len(candidates))
        if keys:
            now = time.monotonic()
            self.index.expire(now)
            sub = self._by_slot.get(self._slots.get(best, -1))
            # Only a worker whose events are heard: nothing would confirm or evict the
            # blocks of one that publishes nothing.
            if sub is not None and sub.stats.batches:
                start = rank[0]
                new = keys[start : start + _EXPECT_BLOCKS]
                self.index.expect(self._slots[best], new, now, _EXPECT_S)
        return best

    def _count(self, e: Endpoint, m: int) -> None:
        picks = self._picks
        picks[e] = picks.get(e, 0.0) + 1.0
        self._n += 1
        if self._n >= _WINDOW * m:  # about the last _WINDOW × m requests count
            self._n = 0
            for k in picks:
                picks[k] /= 2

    def score(self, candidates: Sequence[Endpoint], request: RoutingRequest) -> list[float]:
        """hit(e) under both bounds, else 0 (when other scorers weigh as much)."""
        n = len(candidates)
        keys = request.blocks
        self.spilled = False
        if not keys or not self.index.holders:
            return [0.0] * n
        held = self._held(candidates, keys)
        if not any(held):
            return [0.0] * n
        total = len(keys)
        busy, share = self._bounds(candidates)
        get = self._picks.get
        out = []
        best = over = 0.0
        for e, h in zip(candidates, held, strict=True):
            hit = h / total
            if e.outstanding < busy and get(e, 0.0) < share:
                out.append(hit)
                best = max(best, hit)
            else:
                out.append(0.0)
                over = max(over, hit)
        self.spilled = over > best
        self.hit = True
        return out

    def why(self, winner: Endpoint, request: RoutingRequest) -> str:
        """The routing decision's reason when this scorer decided."""
        if self.spilled:
            return "bounded_load_overflow"
        return "kv_cache_hit" if self.hit else "least_loaded"

    # ------------------------------------------------------------------ status

    def counters(self) -> dict[str, float]:
        """For the engine's status counters: events, recovery, the index's size (the two
        `kv_index_*` figures go up and down: blocks and estimated bytes held now)."""
        c: dict[str, float] = {
            "kv_events_batches": 0,
            "kv_events_gaps": 0,
            "kv_events_replayed": 0,
            "kv_events_resyncs": 0,
            "kv_events_restarts": 0,
        }
        for sub in self._subs:
            st = sub.stats
            c["kv_events_batches"] += st.batches
            c["kv_events_gaps"] += st.gaps
            c["kv_events_replayed"] += st.replayed
            c["kv_events_resyncs"] += st.resyncs
            c["kv_events_restarts"] += st.restarts
        idx = self.index
        c["kv_index_orphans"] = idx.orphans
        c["kv_index_overflows"] = idx.overflows
        c["kv_index_blocks"] = idx.size()
        c["kv_index_bytes"] = idx.nbytes()
        c["kv_tokenized_in_thread"] = self.threaded
        c["kv_untokenized"] = self.untokenized
        return c


# ---------------------------------------------------------------------- configuration


def kv_events_issues(spec: ModelSpec, mode: str, tokenizer: str = "hf") -> list[SpecIssue]:
    """Why `spec` cannot route on KV-cache events, for `gateway check`. `mode` is the
    engine's `kv_events_mode`: "attach" (each endpoint names its source in
    `routing.kv_events.sources`), "launch" (the engine starts its workers publishing) or
    "none" (its workers publish no such events); `tokenizer` the engine's default one."""
    if not spec.routing.scorers.get(KVCacheHitScorer.name):
        return []
    path = f"routing.scorers.{KVCacheHitScorer.name}"
    kv = spec.routing.kv_events
    if mode == "none":
        return [SpecIssue(path=path, message="this engine's workers publish no KV-cache events")]
    issues: list[SpecIssue] = []
    if spec.attach or mode == "attach":
        urls = {base_url(u): u for u in spec.endpoints}
        have = {base_url(u) for u in kv.sources}
        for i, url in enumerate(spec.endpoints):
            if base_url(url) not in have:
                issues.append(
                    SpecIssue(
                        path="routing.kv_events.sources",
                        message=f"endpoints[{i}] ({url}) has no event source; kv_cache_hit "
                        "needs each worker's KV-cache events (vLLM --kv-events-config)",
                    )
                )
        for url in kv.sources:
            if base_url(url) not in urls:
                issues.append(
                    SpecIssue(
                        path=f"routing.kv_events.sources.{url}",
                        message="not one of this model's endpoints",
                    )
                )
    if (kv.tokenizer or tokenizer) == "hf" and not (kv.tokenizer_path or spec.model):
        issues.append(
            SpecIssue(
                path="routing.kv_events.tokenizer_path",
                message="tokenizer hf needs the model's tokenizer: give tokenizer_path (or model)",
            )
        )
    return issues


def attach_sources(spec: ModelSpec, urls: Sequence[str]) -> list[EventSource | None]:
    """Each worker's event source as `routing.kv_events.sources` names it (None: none)."""
    by_url = {base_url(u): s for u, s in spec.routing.kv_events.sources.items()}
    out: list[EventSource | None] = []
    for url in urls:
        s = by_url.get(base_url(url))
        out.append(None if s is None else EventSource(s.endpoint, s.replay, s.topic))
    return out
