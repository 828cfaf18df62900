"""The engine for any OpenAI-compatible upstream, and the base of the vLLM, LMDeploy and sim
engines.

Owns the upstream hop's lifecycle and relay: one keep-alive connection pool per endpoint
(`engines.upstream.http1`) for the generate and embedding requests and one aiohttp session
for the cold paths (health, metrics, adapters), the routing request of each call (prefix
and session keys only when a scorer needs them), relaying non-streamed bodies, making a
stream's attempts (each relayed by one `engines.upstream.attempt.Attempt`: after the first
byte a failure ends the stream with an error event, counted toward ejection, unless the
model continues streams: `engines.upstream.continuation`, which reaches the engine through
its public `Host` methods), the gateway's direct path into the relay (`_direct_sink`), and
the runtime LoRA API. Sending with retries, the retry budget and
ejection accounting are `engines.upstream.send`; probes, re-admission and wedge detection
`engines.upstream.health`. It does not launch workers (subclasses do, through
`start_workers`), validate client requests, frame SSE for the client, or count anything
for the gateway's metrics (it exposes counters in `status()`).

Hooks for subclasses:
- `start_workers()` returns the workers' base URLs (default: `spec.endpoints`);
- `apply_start_adapters()` loads `spec.lora.adapters` (default: through the runtime API);
- `metrics_prefix` (empty: no scrape) and `read_worker_metrics()` map the worker's metrics
  into `WorkerStatus` (by default every family of `engines.upstream.worker_metrics`, told
  per worker, so one pool may mix vLLM and LMDeploy workers);
- `normalise_error(status, body)` turns an upstream error answer into a ServingError;
- `transform_response(obj)` / `transform_chunk(obj)`: overriding either one switches that
  path from byte relay to parse → transform → dump (the fast path never calls them);
- `options_model` (a pydantic model, `engines.upstream.options`) types the `options:` keys;
- `routing:` in models.yaml picks the scorers (`engines.upstream.routing`).

Why a hand-written client (`engines.upstream.http1`) rather than aiohttp or httpx for the hot path:
aiohttp's client was ~30 % of the gateway's CPU at 64 concurrent non-streamed requests
(httpx's far more: docs/benchmarks.md), the hand-written one ~4 times cheaper per request
(numbers in `engines.upstream.http1`); every microsecond of this hop is the gateway's overhead.
The request bytes are built once per request from a per-endpoint, per-route head (request
line, Host, Content-Type, Authorization) in one `%` operation.

Why the stream relay is hand-written (`engines.upstream.attempt`): each upstream read is
split at the last `\\n\\n` (`engines.upstream.sse.SSEBuffer`) and the run of complete
events is yielded as the very bytes the upstream sent; JSON is parsed only for runs that
contain `[DONE]`, an `"error"` key, an SSE comment, or when a model rename / transform hook
is active.

Why one module of ~600 lines: the class is the one contract surface subclasses extend; its
lifecycle and its hooks share the endpoints, sessions and counters. The send path, the
relay of an attempt, health, routing, adapters, continuation, SSE splitting and error
shapes are already their own modules beside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import aiohttp
import orjson

from engines.base import (
    Completed,
    EmbedRequest,
    EngineBase,
    EngineContext,
    EngineStatus,
    EngineUnavailable,
    GenerateRequest,
    Placement,
    ServingError,
    SpecIssue,
    UpstreamError,
    Usage,
    WorkerStatus,
)
from engines.options import EngineOptions, options_issues, parse_options
from engines.spec import ModelSpec
from engines.upstream.adapters import AdapterFanout
from engines.upstream.attempt import Attempt, Rewrite
from engines.upstream.continuation import continuable, continuation_issues, continued_stream
from engines.upstream.endpoints import Endpoint
from engines.upstream.errors import (
    error_status_of_event,
    normalise_error,
)
from engines.upstream.health import HealthChecks
from engines.upstream.options import UpstreamOptions
from engines.upstream.outliers import Outliers, RetryBudget
from engines.upstream.relay import process_run
from engines.upstream.routing import SCORERS, Router, RoutingRequest
from engines.upstream.routing.hashring import stable_hash
from engines.upstream.routing.kv_cache_hit import (
    KVCacheHitScorer,
    attach_sources,
    kv_events_issues,
)
from engines.upstream.routing.kv_events import EventSource
from engines.upstream.routing.prefix import prompt_prefix
from engines.upstream.send import Sender
from engines.upstream.sse import SSEBuffer, cut_events, direct_run
from engines.upstream.worker_metrics import FAMILIES, read_load

__all__ = ["OpenAIEngine"]

log = logging.getLogger("engines.upstream")

# How often a worker's /metrics is scraped when no scorer routes on it. On the H200 fleet
# test (docs/gpu.md, run 5) four front doors and the control process probing every second
# meant ten GETs a second at each vLLM API server, the process that limits throughput
# there; nothing read the load figures more often than an operator's dashboard would.
METRICS_IDLE_S = 15.0


def _direct_sink(req: GenerateRequest, buf: SSEBuffer) -> Callable[[bytes], bool]:
    """The upstream connection's sink for one stream (`http1.Stream.set_sink`): the
    complete events a piece finishes — with any partial event buffered before it, CRLF
    made LF — go to the gateway's direct path (`GenerateRequest.direct`) from the protocol
    callback when they are all plain chunks (`sse.direct_run`: `"usage":null` included);
    a piece that completes no event is kept in the buffer (the consumer sleeps on). All
    else — `[DONE]`, a non-null usage, an error, a comment — and everything while the
    gateway has no direct path, takes the attempt's read loop (`engines.upstream.attempt`),
    the buffer untouched.

    Why: a plain chunk then costs no future, task wake-up or generator resumption
    (docs/benchmarks.md, "Stream relay: the direct path", for what that did to the
    gateway's CPU). Why the first branch: most reads are one whole LF-framed event with
    nothing buffered, and then nothing is joined or cut (bench/direct_path_micro.py)."""

    def sink(data: bytes) -> bool:
        direct = req.direct
        if direct is None:
            return False
        pending = buf.pending
        if not pending and data.endswith(b"\n\n") and b"\r" not in data:
            return direct_run(data) and direct(data)
        run, rest = cut_events(pending, data)
        if not run:  # an event split over reads: held until its end arrives
            buf.pending = rest
            return True
        if direct_run(run) and direct(run):
            buf.pending = rest
            return True
        return False

    return sink


class OpenAIEngine(Sender, EngineBase):
    """Engine "openai": relays to OpenAI-compatible servers listed in `spec.endpoints`."""

    metrics_prefix: ClassVar[str] = "vllm:"
    placement: ClassVar[Placement] = "attached"
    options_model: ClassVar[type[EngineOptions]] = UpstreamOptions
    # Why `options.continue_streams` cannot apply to this engine's workers (None: it can;
    # they take vLLM's `continue_final_message`).
    continuation_unsupported: ClassVar[str | None] = None
    # Where the `kv_cache_hit` scorer's event sources come from: "attach" (models.yaml's
    # `routing.kv_events.sources`), "launch" (the engine starts its workers publishing:
    # `kv_event_sources`) or "none" (its workers publish no KV-cache events).
    kv_events_mode: ClassVar[str] = "attach"
    # The tokenizer `kv_cache_hit` reads prompts with unless models.yaml names one.
    kv_tokenizer: ClassVar[str] = "hf"
    # Streams continued on another worker after a mid-stream failure.
    continuations: int = 0

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        opts = parse_options(spec, self.options_model)
        assert isinstance(opts, UpstreamOptions)
        self.opts: UpstreamOptions = opts
        self._session: aiohttp.ClientSession | None = None
        self._endpoints: list[Endpoint] = []
        self.router = Router.from_spec(spec.routing, SCORERS)
        self._needs_prefix = "prefix" in self.router.needs
        self._needs_session = "session" in self.router.needs
        # The KV-cache-event scorer, when on: it owns the index, the event subscribers and
        # the tokenizer, started and stopped with the engine.
        self._kv: KVCacheHitScorer | None = next(
            (sc for sc, _w in self.router.scorers if isinstance(sc, KVCacheHitScorer)), None
        )
        on_demand = "lora_affinity" in spec.routing.scorers and spec.lora is not None
        self._slots = spec.lora.max_adapters if spec.lora is not None else 0
        self.adapter_state = AdapterFanout(
            spec.name, self.normalise_error, opts.adapter_timeout_s, on_demand, self._slots
        )
        self._on_demand = on_demand
        self._adapters = self.adapter_state.loaded
        self._health_task: asyncio.Task[None] | None = None
        self._forward_id = opts.forward_request_id
        self._continue_streams = opts.continue_streams
        self.budget = RetryBudget(opts.retry_budget_ratio, opts.retry_budget_min)
        self.outliers = Outliers(opts.eject_after_failures, opts.eject_base_s, opts.eject_max_s)
        self.health = HealthChecks(
            spec.name,
            opts,
            FAMILIES if self.metrics_prefix else (),
            self.read_worker_metrics,
            self.adapter_state.reapply,
            self.outliers,
            self.budget,
            self._metrics_every(opts),
            spec.upstream_name,
        )
        # The name to write into responses when the upstream serves under another one.
        self._rename: str | None = (
            spec.name if spec.served_model_name and spec.served_model_name != spec.name else None
        )
        cls = type(self)
        self._custom_response = cls.transform_response is not OpenAIEngine.transform_response
        self._custom_chunk = cls.transform_chunk is not OpenAIEngine.transform_chunk

    # ------------------------------------------------------------------ spec checks

    @classmethod
    def check_options(cls, spec: ModelSpec) -> list[SpecIssue]:
        """`options:` against the engine's options model, `routing:` against the
        scorers this engine knows, and where `continue_streams` cannot apply."""
        issues = options_issues(spec, cls.options_model)
        issues += continuation_issues(spec, cls.continuation_unsupported)
        issues += kv_events_issues(spec, cls.kv_events_mode, cls.kv_tokenizer)
        for name in spec.routing.scorers:
            if name not in SCORERS:
                issues.append(
                    SpecIssue(
                        path=f"routing.scorers.{name}",
                        message=f"unknown scorer; known: {', '.join(sorted(SCORERS))}",
                    )
                )
        return issues

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues: list[SpecIssue] = []
        if not spec.endpoints:
            issues.append(
                SpecIssue(
                    path="endpoints",
                    message="the openai engine attaches to running servers: list their base "
                    "URLs (it launches nothing)",
                )
            )
        why = "the openai engine attaches to a running server and cannot apply it; configure "
        why += "the upstream itself, or use engine vllm / lmdeploy to launch one"
        if spec.quantization != "none":
            issues.append(SpecIssue(path="quantization", message=why))
        if spec.speculative is not None:
            issues.append(SpecIssue(path="speculative", message=why))
        if "batching" in spec.model_fields_set:
            issues.append(SpecIssue(path="batching", message=why))
        if spec.engine_args:
            issues.append(SpecIssue(path="engine_args", message=why))
        return issues + cls.check_options(spec)

    # ------------------------------------------------------------------ lifecycle

    async def start_workers(self) -> list[str]:
        """Base URLs of the workers to relay to. Subclasses that launch workers override
        this (launch, then return their URLs); `start()` then waits for their health."""
        return list(self.spec.endpoints)

    def kv_event_sources(self, urls: list[str]) -> list[EventSource | None]:
        """Each worker's KV-cache event source, for `kv_cache_hit` (default: as models.yaml
        names them). Engines that launch publishing workers override this."""
        return attach_sources(self.spec, urls)

    def _metrics_every(self, opts: UpstreamOptions) -> float:
        """How often the health loop scrapes a worker's /metrics: at every probe when a
        scorer routes on it (`needs` "load"), else every METRICS_IDLE_S (see the option)."""
        if opts.metrics_interval_s is not None:
            return opts.metrics_interval_s
        if "load" in self.router.needs:
            return 0.0
        return max(METRICS_IDLE_S, opts.health_interval_s)

    def _upstream_headers(self) -> dict[str, str]:
        """Headers every upstream request carries (Content-Type, Authorization)."""
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise EngineUnavailable(
                    f"model {self.spec.name!r}: environment variable "
                    f"{self.spec.api_key_env} (api_key_env) is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _make_session(self) -> aiohttp.ClientSession:
        """The cold paths' session (health, metrics, adapters)."""
        headers = self._upstream_headers()
        o = self.opts
        return aiohttp.ClientSession(
            # No pool limit: the gateway's admission control bounds concurrency, and a
            # second limit here would only queue requests invisibly.
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=o.connect_timeout_s,
                sock_read=o.read_timeout_s,
            ),
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def start(self) -> None:
        self._session = self._make_session()
        try:
            urls = await self.start_workers()
            if not urls:
                raise EngineUnavailable(f"model {self.spec.name!r}: no endpoints")
            self._endpoints = [Endpoint.make(u) for u in urls]
            headers = self._upstream_headers()
            connect_s = self.opts.connect_timeout_s
            read_s = self.opts.read_timeout_s
            for ep in self._endpoints:
                ep.connect(headers, connect_s, read_s)
                ep.adapter_slots = self._slots
            if self._kv is not None:
                await self._kv.start(
                    self._endpoints, self.kv_event_sources(urls), self.spec.model, self.kv_tokenizer
                )
            await self._wait_healthy(self.opts.start_timeout_s)
            await self.apply_start_adapters()
            self._health_task = asyncio.create_task(
                self.health.run(lambda: self._session, lambda: self._endpoints),
                name=f"health:{self.spec.name}",
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        task, self._health_task = self._health_task, None
        if self._kv is not None:
            await self._kv.stop()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        for ep in self._endpoints:
            ep.healthy, ep.detail = False, "stopped"
            if ep.pool is not None:
                ep.pool.close()

    async def _wait_healthy(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await self._probe_all()
            if all(ep.healthy for ep in self._endpoints):
                return
            # A misconfigured worker answered (`engines.upstream.health`): no use waiting
            # for it; the model starts, not ready without a serving worker, and the health
            # loop admits it once it serves the name.
            settled = all(ep.healthy or ep.misconfigured for ep in self._endpoints)
            if settled or loop.time() >= deadline:
                down = "; ".join(
                    f"{ep.url}: {ep.detail}" for ep in self._endpoints if not ep.healthy
                )
                if settled or any(ep.healthy for ep in self._endpoints):
                    self.progress(f"model {self.spec.name!r}: starting without {down}")
                    return
                raise EngineUnavailable(
                    f"model {self.spec.name!r}: no endpoint healthy after {timeout_s:g} s ({down})"
                )
            await asyncio.sleep(0.1)

    async def _probe_all(self) -> None:
        if self._session is not None:
            await self.health.round(self._session, self._endpoints)

    async def _probe(self, ep: Endpoint) -> None:
        """One health probe of one worker (`engines.upstream.health`)."""
        if self._session is not None:
            await self.health.probe(self._session, ep)

    # ------------------------------------------------------------------ the hot path

    def _routing_request(self, req: GenerateRequest) -> RoutingRequest:
        """What the router may know of `req`; the hashes only when a scorer needs them."""
        if not (self._needs_prefix or self._needs_session):
            return RoutingRequest(adapter=req.adapter)
        prefix = session = None
        if self._needs_prefix:
            text = prompt_prefix(req.body, self.spec.routing.prefix_chars)
            prefix = stable_hash(text) if text else None
        if self._needs_session:
            key = req.session or req.body.get("user")
            session = stable_hash(str(key)) if key else None
        return RoutingRequest(adapter=req.adapter, prefix=prefix, session=session)

    def _encode(self, body: dict[str, Any], adapter: str | None) -> bytes:
        target = adapter or self.spec.upstream_name
        if body.get("model") != target:
            body = {**body, "model": target}
        return orjson.dumps(body)

    async def _request(
        self,
        route: str,
        data: bytes,
        request_id: str,
        rreq: RoutingRequest | None = None,
        trace: GenerateRequest | None = None,
    ) -> bytes:
        """A whole upstream answer's body (non-streamed routes). A cancelled request closes
        its connection (inside `http1`): that is how it reaches the upstream at once."""
        ep, resp, _ = await self._send(route, data, request_id, False, rreq, trace)
        ep.outstanding -= 1
        body: bytes = resp.body
        return body

    def _decode(self, body: bytes) -> dict[str, Any]:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream answered 200 with a body that is not JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamError("upstream answered 200 with a JSON body that is not an object")
        if "error" in obj and "choices" not in obj and "data" not in obj:
            raise self._error_from_event(obj, body)
        return obj

    @staticmethod
    def _usage(obj: dict[str, Any]) -> Usage | None:
        u = obj.get("usage")
        if not isinstance(u, dict):
            return None
        return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))

    async def complete(self, req: GenerateRequest) -> Completed:
        route = "chat" if req.route == "chat" else "completions"
        rreq = self._routing_request(req)
        if self._kv is not None:
            rreq = await self._kv.with_blocks(rreq, req.route, req.body, req.adapter)
        body = await self._request(
            route, self._encode(req.body, req.adapter), req.request_id, rreq, req
        )
        obj = self._decode(body)
        rename = self._rename if req.adapter is None else None
        if rename is not None or self._custom_response:
            if rename is not None:
                obj["model"] = rename
            obj = self.transform_response(obj)
            body = orjson.dumps(obj)
        return Completed(body=body, usage=self._usage(obj))

    async def embed(self, req: EmbedRequest) -> Completed:
        body = await self._request("embeddings", self._encode(req.body, None), req.request_id)
        obj = self._decode(body)
        if self._rename is not None or self._custom_response:
            if self._rename is not None:
                obj["model"] = self._rename
            obj = self.transform_response(obj)
            body = orjson.dumps(obj)
        return Completed(body=body, usage=self._usage(obj))

    def stream(self, req: GenerateRequest) -> AsyncGenerator[bytes, None]:
        """One attempt's relay (`engines.upstream.attempt`, the gateway's direct path
        offered through `_direct_sink`), or with `continue_streams` one attempt after
        another (`engines.upstream.continuation`). Nothing runs before the first
        iteration."""
        chat = req.route == "chat"
        if self._continue_streams and continuable(chat, req.body):
            return continued_stream(self, req, chat)
        rewrite, slow = self.chunk_rewrite(req)
        return self.attempt(req).relay(
            rewrite, slow, lambda buf: _direct_sink(req, buf), tail=req.tail
        )

    def attempt(
        self,
        req: GenerateRequest,
        body: dict[str, Any] | None = None,
        tried: list[Endpoint] | None = None,
    ) -> Attempt:
        """One attempt of `req`'s stream; a continuation's with its own `body`, on a worker
        not in `tried` (which count toward `max_retries`)."""
        return Attempt(
            partial(self._open, req, req.body if body is None else body, tried),
            self._failed,
            self._error_from_event,
            self.spec.name,
            req.request_id,
        )

    async def _open(
        self, req: GenerateRequest, body: dict[str, Any], tried: list[Endpoint] | None
    ) -> tuple[Endpoint, Any, bytes]:
        rreq = self._routing_request(req)
        if self._kv is not None:
            rreq = await self._kv.with_blocks(rreq, req.route, req.body, req.adapter)
        route = "chat" if req.route == "chat" else "completions"
        data = self._encode(body, req.adapter)
        return await self._send(route, data, req.request_id, True, rreq, req, tried)

    def chunk_rewrite(self, req: GenerateRequest) -> tuple[Rewrite, bool]:
        """How a run that is not plain reaches the client (`relay.process_run`: the
        model's rename, `transform_chunk`, error events), and whether every run takes
        that way (a rename or a transform hook)."""
        rename = self._rename if req.adapter is None else None
        transform = self.transform_chunk if self._custom_chunk else None
        rewrite = partial(
            process_run, rename=rename, transform=transform, error_of=self._error_from_event
        )
        return rewrite, rename is not None or transform is not None

    def has_worker(self, req: GenerateRequest, tried: list[Endpoint]) -> bool:
        """Whether a worker not in `tried` may take an attempt of `req` now."""
        return self._pick(self._routing_request(req), tried) is not None

    def _error_from_event(self, obj: dict[str, Any], raw: bytes) -> ServingError:
        """An error sent with status 200 (in a stream, or a body): its own code decides."""
        return self.normalise_error(error_status_of_event(obj), raw)

    # ------------------------------------------------------------------ tokenize

    async def tokenize(
        self, body: dict[str, Any], avoid: Sequence[Endpoint] = ()
    ) -> dict[str, Any]:
        """`avoid`: workers not to ask (a continuation's, whose worker just failed)."""
        return await self._token_call("/tokenize", body, avoid)

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._token_call("/detokenize", body)

    async def _token_call(
        self, path: str, body: dict[str, Any], avoid: Sequence[Endpoint] = ()
    ) -> dict[str, Any]:
        """vLLM's /tokenize or /detokenize, relayed to the least busy serving worker (a
        cold path: the aiohttp session; a worker without the route answers its own 404)."""
        session = self._session
        serving = [
            ep for ep in self._endpoints if ep.healthy and not ep.ejected and ep not in avoid
        ]
        if session is None or not serving:
            raise self._no_worker()
        ep = min(serving, key=lambda e: e.outstanding)
        try:
            async with session.post(ep.url + path, data=self._encode(body, None)) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"model {self.spec.name!r}: a worker did not answer {path}") from e
        if status != 200:
            raise self.normalise_error(status, raw)
        return self._decode(raw)

    # ------------------------------------------------------------------ hooks

    def transform_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a whole response before it reaches the client. Overriding this puts
        every non-streamed response on the parse → dump path."""
        return obj

    def transform_chunk(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Rewrite (or drop, with None) one stream chunk. Overriding this puts every
        stream on the parse → dump path."""
        return obj

    def normalise_error(self, status: int, body: bytes) -> ServingError:
        """The ServingError for an upstream error answer (`engines.upstream.errors`)."""
        return normalise_error(status, body)

    # ------------------------------------------------------------------ adapters

    async def apply_start_adapters(self) -> None:
        """Load `spec.lora.adapters` on every healthy endpoint through the runtime API.
        Subclasses that pass adapters on the worker's command line may override this to
        only record them."""
        if self.spec.lora is None:
            return
        healthy = [ep for ep in self._endpoints if ep.healthy]
        await self.adapter_state.apply_start(
            self._session, healthy, [(a.name, a.path) for a in self.spec.lora.adapters]
        )

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def load_adapter(self, name: str, path: str) -> None:
        await self.adapter_state.load(self._session, self._endpoints, name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.adapter_state.unload(self._session, self._endpoints, name)

    def adopt_adapter(self, name: str, path: str) -> None:
        self.adapter_state.loaded[name] = path

    def forget_adapter(self, name: str) -> None:
        self.adapter_state.loaded.pop(name, None)

    async def _adapter_call(
        self, ep: Endpoint, op: str, name: str, path: str | None = None, tolerate: bool = False
    ) -> None:
        await self.adapter_state.call(self._session, ep, op, name, path, tolerate)

    # ------------------------------------------------------------------ status

    def read_worker_metrics(self, m: dict[str, float], w: WorkerStatus) -> None:
        """Fill `w` from a worker's scraped metric sums. The engine family is told per
        worker (`engines.upstream.worker_metrics`), so a pool may mix vLLM and LMDeploy."""
        read_load(m, w)

    def status(self) -> EngineStatus:
        workers: list[WorkerStatus] = []
        for ep in self._endpoints:
            w = WorkerStatus(
                url=ep.url,
                healthy=ep.healthy,
                detail=ep.detail,
                ejected=ep.ejected,
                ejections=ep.ejections,
                last_error=ep.last_error,
                outstanding=ep.outstanding,
            )
            self.read_worker_metrics(ep.metrics, w)
            workers.append(w)
        serving = sum(w.healthy and not w.ejected for w in workers)
        detail = f"{serving}/{len(workers)} endpoints serving"
        # Panic routing (`options.panic_threshold`) still sends to healthy ejected workers:
        # the model takes requests, so it is ready (a readiness probe that said otherwise
        # would take the gateway out of its Service while it serves).
        panic = 0
        if not serving and self.opts.panic_threshold is not None:
            panic = sum(w.healthy for w in workers)
            if panic:
                detail += f", panic routing over {panic} ejected"
        return EngineStatus(
            ready=serving > 0 or panic > 0,
            detail=detail,
            running=sum(w.running or 0 for w in workers),
            waiting=sum(w.waiting or 0 for w in workers),
            workers=workers,
            decisions=dict(self.router.decisions),
            counters={
                "retries": self.budget.retries_total,
                "retry_budget_exhausted": self.budget.exhausted,
                "ejections": sum(ep.ejections for ep in self._endpoints),
                "wedged": self.health.wedged,
                "fast_fails": self.fast_fails,
                "panic_routes": self.panic_routes,
                "continuations": self.continuations,
                "adapter_loads": self.adapter_state.loads,
                "adapter_evictions": self.adapter_state.evictions,
                "adapter_hits": self.adapter_state.hits,
                "adapter_misses": self.adapter_state.misses,
                **(self._kv.counters() if self._kv is not None else {}),
            },
        )
