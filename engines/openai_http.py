"""The engine for any OpenAI-compatible upstream, and the base of the vLLM, LMDeploy and sim
engines.

Owns the upstream hop: one keep-alive connection pool per endpoint (`engines.http1`) for
the generate and embedding requests and one aiohttp session for the cold paths (health,
metrics, adapters), picking an endpoint (fewest outstanding requests among healthy ones),
one retry on another endpoint before the first byte, relaying non-streamed bodies and
streamed SSE bytes, normalising upstream errors into `engines.base.ServingError`s, a
background loop that checks `/health`, scrapes the workers' `/metrics`, and re-applies
adapters to a worker that comes back, and the runtime LoRA API (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`) on every endpoint. It does not launch workers (subclasses do,
through `start_workers`), validate client requests, frame SSE for the client, or count
anything for the gateway's metrics: those belong to the gateway.

Hooks for subclasses:
- `start_workers()` returns the workers' base URLs (default: `spec.endpoints`);
- `apply_start_adapters()` loads `spec.lora.adapters` (default: through the runtime API);
- `metrics_prefix` and `read_worker_metrics()` map the worker's metrics into `WorkerStatus`;
- `normalise_error(status, body)` turns an upstream error answer into a ServingError;
- `transform_response(obj)` / `transform_chunk(obj)`: overriding either one switches that
  path from byte relay to parse → transform → dump (the fast path never calls them);
- `OPTIONS` and `check_options()` type the `options:` keys the engine accepts.

Why a hand-written client (`engines.http1`) rather than aiohttp or httpx for the hot path:
aiohttp's client was ~30 % of the gateway's CPU at 64 concurrent non-streamed requests
(httpx's far more: docs/benchmarks.md), the hand-written one ~4 times cheaper per request
(numbers in `engines.http1`); every microsecond of this hop is the gateway's overhead.
The request bytes are built once per request from a per-endpoint, per-route head (request
line, Host, Content-Type, Authorization) in one `%` operation.

Why the stream relay is hand-written: each upstream read is split at the last `\\n\\n`
(`engines.sse.SSEBuffer`) and the run of complete events is yielded as the very bytes the
upstream sent; JSON is parsed only for runs that contain `[DONE]`, an `"error"` key, an SSE
comment, or when a model rename / transform hook is active.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import orjson

from engines import http1
from engines.base import (
    AdapterError,
    Completed,
    EmbedRequest,
    EngineContext,
    EngineOverloaded,
    EngineStatus,
    EngineTimeout,
    EngineUnavailable,
    GenerateRequest,
    InvalidRequest,
    ServingError,
    SpecIssue,
    UpstreamError,
    Usage,
    WorkerStatus,
)
from engines.prom_text import sum_samples
from engines.spec import ModelSpec
from engines.sse import SSEBuffer, split_events

__all__ = [
    "AdapterNotFound",
    "OpenAIEngine",
    "PayloadTooLarge",
    "UpstreamModelNotFound",
]

log = logging.getLogger("engines.openai_http")


class UpstreamModelNotFound(InvalidRequest):
    """The upstream does not serve the model (or adapter) named: 404 model_not_found."""

    status = 404

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = None):
        super().__init__(message, param=param, code=code or "model_not_found")


class AdapterNotFound(AdapterError):
    """Unloading an adapter that is not loaded."""

    status = 404


class PayloadTooLarge(InvalidRequest):
    status = 413


# Options every OpenAIEngine (and subclass) accepts under `options:`: name → (type, default).
_OPTIONS: dict[str, tuple[type, Any]] = {
    "connect_timeout_s": (float, 10.0),
    # Longest silence while reading a response (streamed or not); a non-streamed answer of a
    # long generation arrives only at its end, so this is generous.
    "read_timeout_s": (float, 600.0),
    "health_interval_s": (float, 5.0),
    "health_timeout_s": (float, 3.0),
    "start_timeout_s": (float, 60.0),
    "adapter_timeout_s": (float, 120.0),
    # GET this path to check a worker ("/v1/models" for upstreams without /health);
    # any status below 500 counts as alive.
    "health_path": (str, "/health"),
    # Send the gateway's request id as X-Request-Id (vLLM uses it as its request id).
    "forward_request_id": (bool, True),
}


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


@dataclass(slots=True, eq=False)
class _Endpoint:
    """One upstream worker: its connection pool, request heads (built once), load and
    health."""

    url: str
    pool: http1.Pool | None = None
    # Per route: request line, Host and the fixed headers (see `connect`).
    chat: bytes = b""
    completions: bytes = b""
    embeddings: bytes = b""
    outstanding: int = 0
    healthy: bool = False
    detail: str = "not checked yet"
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def make(cls, url: str) -> _Endpoint:
        return cls(url=_base_url(url))

    def connect(self, headers: dict[str, str], connect_timeout: float, read_timeout: float) -> None:
        pool = self.pool = http1.Pool(
            self.url, connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        self.chat = pool.request_head("POST", "/v1/chat/completions", headers)
        self.completions = pool.request_head("POST", "/v1/completions", headers)
        self.embeddings = pool.request_head("POST", "/v1/embeddings", headers)


def _no_progress(*_args: Any, **_kw: Any) -> None:
    return None


class OpenAIEngine:
    """Engine "openai": relays to OpenAI-compatible servers listed in `spec.endpoints`."""

    metrics_prefix: ClassVar[str] = "vllm:"
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = _OPTIONS

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        self.spec = spec
        self.context = context
        self.progress: Callable[..., Any] = context.progress if context else _no_progress
        opts = {k: spec.options.get(k, default) for k, (_t, default) in self.OPTIONS.items()}
        self.options = opts
        self._session: aiohttp.ClientSession | None = None
        self._endpoints: list[_Endpoint] = []
        self._rr = -1
        self._adapters: dict[str, str] = {}
        self._adapter_lock = asyncio.Lock()
        self._health_task: asyncio.Task[None] | None = None
        self._forward_id = bool(opts["forward_request_id"])
        self._probe_timeout = aiohttp.ClientTimeout(total=float(opts["health_timeout_s"]))
        self._adapter_timeout = aiohttp.ClientTimeout(total=float(opts["adapter_timeout_s"]))
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
        """Type and range checks of the known `options:` keys (unknown keys: caller)."""
        issues: list[SpecIssue] = []
        for key, (typ, _default) in cls.OPTIONS.items():
            if key not in spec.options:
                continue
            value = spec.options[key]
            if typ is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
                msg = "must be a number > 0"
            elif typ is bool:
                ok, msg = isinstance(value, bool), "must be true or false"
            else:
                ok = isinstance(value, str) and value.startswith("/")
                msg = "must be a path starting with /"
            if not ok:
                issues.append(SpecIssue(path=f"options.{key}", message=f"{msg}, got {value!r}"))
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
        for key in spec.options:
            if key not in cls.OPTIONS:
                issues.append(
                    SpecIssue(
                        path=f"options.{key}",
                        message=f"unknown option; known: {', '.join(sorted(cls.OPTIONS))}",
                    )
                )
        return issues + cls.check_options(spec)

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        return []

    # ------------------------------------------------------------------ lifecycle

    async def start_workers(self) -> list[str]:
        """Base URLs of the workers to relay to. Subclasses that launch workers override
        this (launch, then return their URLs); `start()` then waits for their health."""
        return list(self.spec.endpoints)

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
        o = self.options
        return aiohttp.ClientSession(
            # No pool limit: the gateway's admission control bounds concurrency, and a
            # second limit here would only queue requests invisibly.
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=float(o["connect_timeout_s"]),
                sock_read=float(o["read_timeout_s"]),
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
            self._endpoints = [_Endpoint.make(u) for u in urls]
            headers = self._upstream_headers()
            connect_s = float(self.options["connect_timeout_s"])
            read_s = float(self.options["read_timeout_s"])
            for ep in self._endpoints:
                ep.connect(headers, connect_s, read_s)
            await self._wait_healthy(float(self.options["start_timeout_s"]))
            await self.apply_start_adapters()
            self._health_task = asyncio.create_task(
                self._health_loop(), name=f"health:{self.spec.name}"
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        task, self._health_task = self._health_task, None
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
            await asyncio.gather(*(self._probe(ep) for ep in self._endpoints))
            if all(ep.healthy for ep in self._endpoints):
                return
            if loop.time() >= deadline:
                down = "; ".join(
                    f"{ep.url}: {ep.detail}" for ep in self._endpoints if not ep.healthy
                )
                if any(ep.healthy for ep in self._endpoints):
                    self.progress(f"model {self.spec.name!r}: starting without {down}")
                    return
                raise EngineUnavailable(
                    f"model {self.spec.name!r}: no endpoint healthy after {timeout_s:g} s ({down})"
                )
            await asyncio.sleep(0.1)

    async def _health_loop(self) -> None:
        interval = float(self.options["health_interval_s"])
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.gather(*(self._probe(ep) for ep in self._endpoints))
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die; the next round retries
                log.exception("health check of %s failed", self.spec.name)

    async def _probe(self, ep: _Endpoint) -> None:
        """Check one worker; scrape its metrics; re-apply adapters when it comes back."""
        session = self._session
        if session is None:
            return
        try:
            async with session.get(
                ep.url + str(self.options["health_path"]), timeout=self._probe_timeout
            ) as r:
                await r.read()
                ok, detail = r.status < 500, f"health answered {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, detail = False, f"health check failed: {e!r}"
        if ok and self.metrics_prefix:
            try:
                async with session.get(ep.url + "/metrics", timeout=self._probe_timeout) as r:
                    if r.status == 200:
                        ep.metrics = sum_samples(await r.text(), self.metrics_prefix)
            except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
                pass  # metrics are best effort; health decides
        if not ok:
            ep.healthy, ep.detail = False, detail
            return
        if not ep.healthy:
            # Back (or up for the first time): it may have restarted without our adapters.
            try:
                for name, path in list(self._adapters.items()):
                    await self._adapter_call(ep, "load", name, path, tolerate=True)
            except ServingError as e:
                ep.detail = f"re-applying adapters failed: {e.message}"
                return
            ep.healthy, ep.detail = True, "ok"

    # ------------------------------------------------------------------ the hot path

    def _pick(self, exclude: _Endpoint | None = None) -> _Endpoint | None:
        """Fewest outstanding requests among healthy endpoints. With none healthy, any
        (health may be stale; a failed connection marks it down again)."""
        eps = self._endpoints
        if len(eps) == 1:
            return eps[0] if exclude is None else None
        # Scan from a rotating start so that ties (an idle fleet) go round-robin.
        n = len(eps)
        start = self._rr = (self._rr + 1) % n
        best: _Endpoint | None = None
        for i in range(n):
            ep = eps[(start + i) % n]
            if (
                ep.healthy
                and ep is not exclude
                and (best is None or ep.outstanding < best.outstanding)
            ):
                best = ep
        if best is None:
            others = [ep for ep in eps if ep is not exclude]
            if others:
                best = min(others, key=lambda e: e.outstanding)
        return best

    def _encode(self, body: dict[str, Any], adapter: str | None) -> bytes:
        target = adapter or self.spec.upstream_name
        if body.get("model") != target:
            body = {**body, "model": target}
        return orjson.dumps(body)

    async def _send(
        self, route: str, data: bytes, request_id: str, stream: bool
    ) -> tuple[_Endpoint, Any]:
        """POST to a picked endpoint; before any response byte, retry a failed connection
        once on another endpoint (or the same one when it is the only one and the failure
        was a dropped connection). Returns the endpoint, with its outstanding count raised
        (the caller lowers it), and an `http1.Stream` (stream) or a whole `http1.Response`."""
        if self._session is None:
            raise EngineUnavailable(f"model {self.spec.name!r} is not started")
        ep = self._pick()
        if ep is None:
            raise EngineUnavailable(f"model {self.spec.name!r} has no endpoints")
        rid = (
            request_id.encode()
            if self._forward_id and request_id.isascii() and request_id.isprintable()
            else None
        )
        for attempt in (0, 1):
            pool = ep.pool
            if pool is None:
                raise EngineUnavailable(f"model {self.spec.name!r} is not started")
            head: bytes = getattr(ep, route)
            if rid is None:
                req = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(data), data)
            else:
                req = b"%sX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                    head,
                    rid,
                    len(data),
                    data,
                )
            ep.outstanding += 1
            try:
                resp: Any = await (pool.stream(req) if stream else pool.fetch(req))
            except TimeoutError as e:
                ep.outstanding -= 1
                raise EngineTimeout(f"upstream {ep.url} did not answer in time: {e!r}") from e
            except (http1.ConnectError, http1.Disconnected) as e:
                ep.outstanding -= 1
                refused = isinstance(e, http1.ConnectError)
                if refused:
                    ep.healthy, ep.detail = False, f"connection failed: {e}"
                other = self._pick(ep)
                if attempt == 0 and (other is not None or not refused):
                    ep = other or ep
                    continue
                raise EngineUnavailable(f"upstream {ep.url} unreachable: {e}") from e
            except http1.ProtocolError as e:
                ep.outstanding -= 1
                raise UpstreamError(f"upstream {ep.url} failed mid-response: {e}") from e
            except BaseException:
                ep.outstanding -= 1
                raise
            return ep, resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer_error(self, status: int, body: bytes, retry_after: bytes | None) -> ServingError:
        err = self.normalise_error(status, body)
        if isinstance(err, EngineOverloaded) and retry_after is not None:
            with contextlib.suppress(ValueError):
                err.retry_after = float(retry_after)
        return err

    async def _read_error(self, ep: _Endpoint, resp: http1.Stream) -> ServingError:
        try:
            body = await resp.read()
        except (http1.ProtocolError, TimeoutError):
            body = b""
        return self._answer_error(resp.status, body, resp.header(b"retry-after"))

    async def _request(self, route: str, data: bytes, request_id: str) -> bytes:
        """A whole upstream answer's body (non-streamed routes). A cancelled request closes
        its connection (inside `http1`): that is how it reaches the upstream at once."""
        ep, resp = await self._send(route, data, request_id, False)
        ep.outstanding -= 1
        if resp.status != 200:
            raise self._answer_error(resp.status, resp.body, resp.header(b"retry-after"))
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
        body = await self._request(route, self._encode(req.body, req.adapter), req.request_id)
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

    async def stream(self, req: GenerateRequest) -> AsyncGenerator[bytes, None]:
        route = "chat" if req.route == "chat" else "completions"
        ep, resp = await self._send(
            route, self._encode(req.body, req.adapter), req.request_id, True
        )
        try:
            if resp.status != 200:
                raise await self._read_error(ep, resp)
            rename = self._rename if req.adapter is None else None
            slow = rename is not None or self._custom_chunk
            buf = SSEBuffer()
            read = resp.read_chunk
            done = False
            while True:
                try:
                    data = await read()
                except TimeoutError as e:
                    raise EngineTimeout(f"upstream {ep.url} stalled mid-stream") from e
                except http1.ProtocolError as e:
                    raise UpstreamError(f"upstream {ep.url} broke the stream: {e}") from e
                if not data:
                    break
                run = buf.feed(data)
                if not run:
                    continue
                # The fast path: the run is relayed as received. Everything unusual (the
                # final [DONE], an error event, comments, non-`data: ` lines) goes slow.
                if (
                    slow
                    or b"[DONE]" in run
                    or b'"error"' in run
                    or b"\n:" in run
                    or not run.startswith(b"data: ")
                ):
                    run, seen_done, error = self._process_run(run, rename)
                    done = done or seen_done
                    if run:
                        yield run
                    if error is not None:
                        raise error
                    continue
                yield run
            if not done:
                raise UpstreamError(f"upstream {ep.url} ended the stream before [DONE]")
        finally:
            ep.outstanding -= 1
            # A body read to its end returns the connection to the pool; anything else
            # (consumer gone, upstream broken, an error event) closes it, so the upstream
            # sees the disconnect and stops generating.
            resp.release()

    # ------------------------------------------------------------------ slow path pieces

    @staticmethod
    def _event_data(event: bytes) -> bytes | None:
        """The data of one SSE event (its `data:` lines joined), None if it has none."""
        if event.startswith(b"data: ") and b"\n" not in event:
            return event[6:]
        lines = [ln for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if not lines:
            return None  # a comment, or only event:/id:/retry: fields
        return b"\n".join(ln[6:] if ln[5:6] == b" " else ln[5:] for ln in lines)

    def _process_run(
        self, run: bytes, rename: str | None
    ) -> tuple[bytes, bool, ServingError | None]:
        """Events of `run` as the gateway gets them, whether `[DONE]` was among them, and
        the ServingError an upstream error event stands for (the events before it are
        still delivered first)."""
        out: list[bytes] = []
        done = False
        rewrite = rename is not None or self._custom_chunk
        for event in split_events(run):
            data = self._event_data(event)
            if data is None:
                continue
            if data == b"[DONE]":
                done = True
                continue
            if rewrite or b'"error"' in data:
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError("upstream sent a stream event that is not JSON") from None
                if isinstance(obj, dict) and (
                    ("error" in obj and "choices" not in obj) or obj.get("object") == "error"
                ):
                    return b"".join(out), done, self._error_from_event(obj, data)
                if rewrite and isinstance(obj, dict):
                    if rename is not None:
                        obj["model"] = rename
                    new = self.transform_chunk(obj)
                    if new is None:
                        continue
                    out.append(b"data: " + orjson.dumps(new) + b"\n\n")
                    continue
            out.append(b"data: " + data + b"\n\n")
        return b"".join(out), done, None

    def _error_from_event(self, obj: dict[str, Any], raw: bytes) -> ServingError:
        """An error sent with status 200 (in a stream, or a body): its own code decides."""
        err = obj.get("error")
        code = err.get("code") if isinstance(err, dict) else obj.get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        return self.normalise_error(status, raw)

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
        """The ServingError for an upstream error answer. Understands OpenAI's envelope,
        vLLM's/LMDeploy's flat `{"object": "error", "message": ...}`, FastAPI's
        `{"detail": ...}` (a string or a validation list), `{"message": ...}`,
        `{"error": "text"}`, and plain text."""
        message, etype, param, code = _parse_error_body(body)
        if not message:
            message = f"upstream answered HTTP {status}"
        text = message.lower()
        if status == 404 and ("model" in text or code == "model_not_found" or "lora" in text):
            return UpstreamModelNotFound(message, param=param or "model")
        if status in (400, 422):
            return InvalidRequest(message, param=param, code=code)
        if status == 413:
            return PayloadTooLarge(message, param=param, code=code)
        if status == 429:
            return EngineOverloaded(message, code=code)
        if status in (408, 504):
            return EngineTimeout(message)
        if status == 503:
            return EngineUnavailable(message)
        if status in (401, 403):
            # The client passed the gateway's auth; the upstream refusing the gateway's
            # own credentials is a configuration fault of this hop.
            return UpstreamError(f"upstream refused the gateway's credentials: {message}")
        if 400 <= status < 500:
            return InvalidRequest(message, param=param, code=code)
        err = UpstreamError(message)
        if etype:
            err.code = code
        return err

    # ------------------------------------------------------------------ adapters

    async def apply_start_adapters(self) -> None:
        """Load `spec.lora.adapters` on every endpoint through the runtime API (tolerating
        'already loaded', e.g. a worker started with --lora-modules). Subclasses that pass
        adapters on the worker's command line may override this to only record them."""
        if self.spec.lora is None:
            return
        for a in self.spec.lora.adapters:
            await asyncio.gather(
                *(
                    self._adapter_call(ep, "load", a.name, a.path, tolerate=True)
                    for ep in self._endpoints
                    if ep.healthy
                )
            )
            self._adapters[a.name] = a.path

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def load_adapter(self, name: str, path: str) -> None:
        async with self._adapter_lock:
            if name in self._adapters:
                raise AdapterError(f"The adapter `{name}` is already loaded.", param="lora_name")
            targets = [ep for ep in self._endpoints if ep.healthy]
            if not targets:
                raise EngineUnavailable(f"model {self.spec.name!r}: no healthy worker")
            results = await asyncio.gather(
                *(self._adapter_call(ep, "load", name, path) for ep in targets),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                # All or nothing: take it off the workers that did load it.
                ok = [ep for ep, r in zip(targets, results, strict=True) if r is None]
                await asyncio.gather(
                    *(self._adapter_call(ep, "unload", name, tolerate=True) for ep in ok),
                    return_exceptions=True,
                )
                raise failed[0]
            self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        async with self._adapter_lock:
            if name not in self._adapters:
                raise AdapterNotFound(
                    f"No adapter named `{name}` is loaded.",
                    param="lora_name",
                    code="adapter_not_found",
                )
            targets = [ep for ep in self._endpoints if ep.healthy]
            results = await asyncio.gather(
                *(self._adapter_call(ep, "unload", name, tolerate=True) for ep in targets),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            # Workers down now get nothing re-applied when they return, since it is gone.
            del self._adapters[name]

    async def _adapter_call(
        self, ep: _Endpoint, op: str, name: str, path: str | None = None, tolerate: bool = False
    ) -> None:
        """vLLM's runtime LoRA API on one worker. `tolerate`: 'already loaded' (load) and
        'not found' (unload) count as success."""
        session = self._session
        if session is None:
            raise EngineUnavailable(f"model {self.spec.name!r} is not started")
        payload: dict[str, str] = {"lora_name": name}
        if op == "load":
            payload["lora_path"] = path or ""
        try:
            async with session.post(
                f"{ep.url}/v1/{op}_lora_adapter",
                data=orjson.dumps(payload),
                timeout=self._adapter_timeout,
            ) as r:
                body, status = await r.read(), r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise EngineUnavailable(f"{op} adapter {name!r} on {ep.url}: {e!r}") from e
        if status == 200:
            return
        err = self.normalise_error(status, body)
        if tolerate and (
            (op == "load" and "already" in err.message.lower())
            or (op == "unload" and status == 404)
        ):
            return
        raise AdapterError(
            f"{op} adapter `{name}` on {ep.url} failed: {err.message}", param="lora_name"
        )

    # ------------------------------------------------------------------ status

    def read_worker_metrics(self, m: dict[str, float], w: WorkerStatus) -> None:
        """Fill `w` from a worker's scraped metric sums (names with `metrics_prefix`)."""
        p = self.metrics_prefix

        def get(name: str) -> float | None:
            return m.get(p + name)

        running, waiting = get("num_requests_running"), get("num_requests_waiting")
        w.running = None if running is None else int(running)
        w.waiting = None if waiting is None else int(waiting)
        kv = get("kv_cache_usage_perc")
        w.kv_cache_usage = kv if kv is not None else get("gpu_cache_usage_perc")
        w.spec_accepted_tokens = get("spec_decode_num_accepted_tokens_total")
        w.spec_draft_tokens = get("spec_decode_num_draft_tokens_total")

    def status(self) -> EngineStatus:
        workers: list[WorkerStatus] = []
        for ep in self._endpoints:
            w = WorkerStatus(url=ep.url, healthy=ep.healthy, detail=ep.detail)
            self.read_worker_metrics(ep.metrics, w)
            workers.append(w)
        healthy = sum(w.healthy for w in workers)
        return EngineStatus(
            ready=healthy > 0,
            detail=f"{healthy}/{len(workers)} endpoints healthy",
            running=sum(w.running or 0 for w in workers),
            waiting=sum(w.waiting or 0 for w in workers),
            workers=workers,
        )

    @property
    def endpoint_urls(self) -> list[str]:
        return [ep.url for ep in self._endpoints]


def _parse_error_body(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, param, code) from any of the error shapes upstreams send."""
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:2000], None, None, None
    if isinstance(obj, str):
        return obj, None, None, None
    if not isinstance(obj, dict):
        return str(obj)[:2000], None, None, None
    src: Any = obj
    if "error" in obj:
        src = obj["error"]
        if not isinstance(src, dict):
            return str(src), None, None, None
    elif "detail" in obj and "message" not in obj:
        detail = obj["detail"]
        if isinstance(detail, list):  # FastAPI / pydantic validation errors
            msgs, param = [], None
            for d in detail:
                if isinstance(d, dict):
                    loc = [str(x) for x in d.get("loc", []) if x != "body"]
                    param = param or (".".join(loc) or None)
                    msgs.append(
                        f"{'.'.join(loc)}: {d.get('msg', '')}" if loc else str(d.get("msg"))
                    )
                else:
                    msgs.append(str(d))
            return "; ".join(msgs), None, param, None
        return str(detail), None, None, None
    message = src.get("message") or src.get("msg") or src.get("detail") or ""
    etype, param, code = src.get("type"), src.get("param"), src.get("code")
    return (
        str(message),
        etype if isinstance(etype, str) else None,
        param if isinstance(param, str) else None,
        code if isinstance(code, str) else None,
    )
