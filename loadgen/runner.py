"""The async load loop: sends OpenAI requests to one base URL and records what came back.

Owns: `LoadConfig` (one run at one concurrency), `Result` (its records and summary),
`run_load()` (the Python API that `gateway bench` and `bench/overhead.py` drive),
and `open_session()`. One request is `loadgen.client.send`.

Why hand-written and not the `openai` SDK or httpx: this tool measures a gateway that adds
well under a millisecond, so the client's own per-request and per-chunk cost must be small
and the same for every target. aiohttp with one pooled session, request bodies encoded
before the clock starts, an incremental SSE splitter over raw bytes and orjson per event is
about as cheap as Python gets, and every timestamp is taken right where bytes arrive.

Arrivals: with `request_rate = inf`, `concurrency` workers each send the next request as
soon as their previous one finished (closed loop). With a finite rate, a dispatcher sends
requests at Poisson arrival times (exponential gaps, seeded) and at most `concurrency` are
in flight; an arrival that finds them all busy waits (as `vllm bench serve
--max-concurrency` does).

Does not own: statistics (metrics.py), output formatting (report.py), plots (plots.py) or
argument parsing (cli.py).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

from loadgen import client
from loadgen.metrics import RequestRecord, summarize

Endpoint = Literal["chat", "completions"]

# A small vocabulary of common words: each is about one token for BPE tokenizers, so
# `prompt_tokens` words make a prompt of roughly that many tokens.
_VOCAB = (
    "the of and to in is was for on are with as be at by this from that have or an they "
    "which one you were all we can her has there been if more when will would who so no "
    "time people year way day man thing woman life child world school state family group "
    "country problem hand part place case week company system program question work number"
)
_WORDS = tuple(_VOCAB.split())


@dataclass(slots=True)
class LoadConfig:
    """One run: one target, one concurrency, one bound (count or duration)."""

    base_url: str
    model: str | None = None  # None: the first model that GET /v1/models lists
    api_key: str | None = None
    endpoint: Endpoint = "chat"
    stream: bool = True
    concurrency: int = 1
    request_rate: float = math.inf  # requests/s, Poisson; inf = closed loop
    num_requests: int | None = None  # None with duration_s None: 200 or 4 x concurrency
    duration_s: float | None = None
    prompt_tokens: int = 32
    # Make every prompt exactly `prompt_tokens` long as the target's own `POST /tokenize`
    # counts it (the gateway's, or vLLM's): for chat, the whole templated prompt, i.e. the
    # request's `usage.prompt_tokens`. Off: `prompt_tokens` words, about as many tokens.
    align_prompts: bool = False
    max_tokens: int = 64
    ignore_eos: bool = False
    warmup: int = 0
    seed: int = 0
    timeout_s: float = 600.0
    capture_chunks: bool = False  # keep raw SSE payloads per request (relay byte check)
    extra_body: dict[str, Any] = field(default_factory=dict)
    extra_headers: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    label: str = ""

    @property
    def api_root(self) -> str:
        """The base URL ending in /v1 (accepts it with or without)."""
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"

    @property
    def url(self) -> str:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return self.api_root + path

    def request_count(self) -> int | None:
        """How many requests the run sends (None: bounded by duration only)."""
        if self.num_requests is not None:
            return self.num_requests
        if self.duration_s is not None:
            return None
        return max(200, 4 * self.concurrency)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = "***" if self.api_key else None
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return out


@dataclass(slots=True)
class Result:
    """The records of one run and the figures derived from them."""

    config: LoadConfig
    model: str
    records: list[RequestRecord]
    duration_s: float
    started_at: float  # wall clock (time.time()) at the first send

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        head: dict[str, Any] = {
            "label": cfg.label,
            "base_url": cfg.base_url,
            "model": self.model,
            "endpoint": cfg.endpoint,
            "stream": cfg.stream,
            "concurrency": cfg.concurrency,
            "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
            "started_at": self.started_at,
        }
        return head | summarize(self.records, self.duration_s)

    def to_json(self, include_requests: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config.to_json(), "summary": self.summary()}
        if include_requests:
            out["requests"] = [r.to_json() for r in self.records]
        return out


def open_session(limit: int) -> aiohttp.ClientSession:
    """One pooled session; `limit` ≥ the concurrency it will carry (0 = unbounded)."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
    )
    # No total timeout: a run's requests are bounded per request in client.send().
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


def synthetic_prompt(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choices(_WORDS, k=max(1, tokens)))


def build_bodies(
    cfg: LoadConfig, model: str, count: int, prompts: list[str] | None = None
) -> list[bytes]:
    """`count` distinct request bodies, encoded now so no JSON work happens under the clock
    (`prompts`: given, e.g. aligned by `align_prompts`; else synthetic)."""
    rng = random.Random(cfg.seed)
    bodies = []
    for i in range(count):
        prompt = prompts[i] if prompts is not None else synthetic_prompt(rng, cfg.prompt_tokens)
        body: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens}
        if cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if cfg.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        body.update(cfg.extra_body)
        bodies.append(orjson.dumps(body))
    return bodies


# Rounds of /tokenize per prompt: words are about one token each, so one or two suffice.
ALIGN_ROUNDS = 6


async def align_prompts(
    session: aiohttp.ClientSession, cfg: LoadConfig, model: str, count: int
) -> list[str]:
    """`count` synthetic prompts, each grown or cut word by word until the target's
    `POST /tokenize` (vLLM's shape, at the server's root) counts `cfg.prompt_tokens` —
    with the chat template for chat, as the request is billed. Before the clock starts; a
    prompt whose template alone is longer keeps one word."""
    rng = random.Random(cfg.seed)
    url = cfg.api_root[: -len("/v1")] + "/tokenize"
    headers = request_headers(cfg)
    gate = asyncio.Semaphore(16)

    async def count_of(words: list[str]) -> int:
        text = " ".join(words)
        body: dict[str, Any] = {"model": model}
        if cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}: {raw[:200]!r}")
        return int(orjson.loads(raw)["count"])

    async def one(words: list[str]) -> str:
        async with gate:
            for _ in range(ALIGN_ROUNDS):
                diff = cfg.prompt_tokens - await count_of(words)
                if diff == 0 or (diff < 0 and len(words) == 1):
                    break
                if diff > 0:
                    words = words + rng.choices(_WORDS, k=diff)
                else:
                    words = words[: max(1, len(words) + diff)]
            return " ".join(words)

    firsts = [rng.choices(_WORDS, k=max(1, cfg.prompt_tokens)) for _ in range(count)]
    return list(await asyncio.gather(*(one(w) for w in firsts)))


def request_headers(cfg: LoadConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    headers.update(cfg.extra_headers)
    return headers


async def resolve_model(session: aiohttp.ClientSession, cfg: LoadConfig) -> str:
    """cfg.model, or the first id that GET /v1/models lists."""
    if cfg.model:
        return cfg.model
    async with session.get(
        cfg.api_root + "/models",
        headers=request_headers(cfg),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as resp:
        resp.raise_for_status()
        data = orjson.loads(await resp.read())
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{cfg.api_root}/models lists no model; pass --model")
    return str(models[0]["id"])


# --------------------------------------------------------------------------------------
# The load loop
# --------------------------------------------------------------------------------------


class _Progress:
    """tqdm on stderr, or nothing. Imported lazily so the API works without a terminal."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc or None,
                unit="req",
                file=sys.stderr,
                mininterval=0.25,
                leave=False,
                dynamic_ncols=True,
            )

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _closed_loop(
    send: Callable[[int, RequestRecord], Awaitable[None]],
    records: list[RequestRecord],
    concurrency: int,
    count: int | None,
    deadline: float | None,
    progress: _Progress,
) -> None:
    """`concurrency` workers, each sending its next request when the last one finished."""
    counter = itertools.count()

    async def worker() -> None:
        while True:
            i = next(counter)
            if count is not None and i >= count:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            rec = RequestRecord()
            records.append(rec)
            await send(i, rec)
            progress.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _poisson(
    send: Callable[[int, RequestRecord], Awaitable[None]],
    records: list[RequestRecord],
    concurrency: int,
    rate: float,
    seed: int,
    count: int | None,
    deadline: float | None,
    progress: _Progress,
) -> None:
    """Requests at Poisson arrival times, at most `concurrency` in flight."""
    rng = random.Random(seed ^ 0x5EED)
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, rec: RequestRecord) -> None:
        try:
            await send(i, rec)
        finally:
            sem.release()
            progress.update()

    next_at = time.perf_counter()
    for i in itertools.count():
        if count is not None and i >= count:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if deadline is not None and time.perf_counter() >= deadline:
            break
        await sem.acquire()
        rec = RequestRecord()
        records.append(rec)
        task = asyncio.create_task(one(i, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.gather(*tasks)


async def run_load(config: LoadConfig, session: aiohttp.ClientSession | None = None) -> Result:
    """Run one load test. Pass `session` to share one pool across interleaved runs."""
    cfg = config
    if cfg.concurrency < 1:
        raise ValueError("concurrency must be ≥ 1")
    own = session is None
    sess = open_session(cfg.concurrency) if session is None else session
    try:
        model = await resolve_model(sess, cfg)
        count = cfg.request_count()
        n = min(count or 1024, 1024)
        prompts = await align_prompts(sess, cfg, model, n) if cfg.align_prompts else None
        bodies = build_bodies(cfg, model, n, prompts)
        headers = request_headers(cfg)
        url = cfg.url
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)

        async def send(i: int, rec: RequestRecord) -> None:
            if cfg.capture_chunks:
                rec.chunks = []
            await client.send(sess, cfg.stream, url, bodies[i % len(bodies)], headers, rec, timeout)

        if cfg.warmup > 0:
            # Warm-up opens the pool's connections; its records are dropped.
            await _closed_loop(
                send,
                [],
                min(cfg.warmup, cfg.concurrency),
                cfg.warmup,
                None,
                _Progress(False, 0, ""),
            )

        records: list[RequestRecord] = []
        progress = _Progress(cfg.progress, count, cfg.label)
        # Objects made during setup never need scanning again; fewer GC pauses under the clock.
        gc.collect()
        gc.freeze()
        started_at = time.time()
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s if cfg.duration_s is not None else None
        try:
            if math.isinf(cfg.request_rate):
                await _closed_loop(send, records, cfg.concurrency, count, deadline, progress)
            else:
                await _poisson(
                    send,
                    records,
                    cfg.concurrency,
                    cfg.request_rate,
                    cfg.seed,
                    count,
                    deadline,
                    progress,
                )
        finally:
            progress.close()
            gc.unfreeze()
        if records:
            first = min(r.start for r in records)
            last = max(r.start + (r.done or 0.0) for r in records)
            duration = last - first
        else:
            duration = time.perf_counter() - t0
        return Result(cfg, model, records, duration, started_at)
    finally:
        if own:
            await sess.close()
