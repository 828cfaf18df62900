"""The vLLM-compatible simulator: a test and benchmark instrument, labelled as such.

Owns: `SimConfig` (what the simulator does), `SimServer` (the HTTP server, in process or
standalone through `serve_main`), and `SimEngine` (the engine registered as "sim", which
launches `replicas` simulator servers on loopback and relays to them exactly like
`OpenAIEngine`). It deliberately does not own any real model, tokenizer or sampling: output
tokens cycle through a word list, prompt tokens are whitespace-separated words, and every
response says it came from the simulator (`system_fingerprint: "gateway-sim"`, header
`server: gateway-sim`, `owned_by: "gateway-sim"` in `/v1/models`).

Wire behaviour follows vLLM's OpenAI server: `/v1/chat/completions` and `/v1/completions`
(streamed as SSE ending in `data: [DONE]`, `stream_options.include_usage`, `n`,
`max_tokens` / `max_completion_tokens`), `/v1/embeddings` (deterministic pseudo-vectors,
float or base64), `/v1/models`, `/health`, `/metrics` (`vllm:*` names), and the runtime
LoRA API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) with vLLM's bodies, messages
and statuses. Errors use vLLM's envelope `{"error": {"message","type","param","code"}}`
(or the older flat `{"object": "error", ...}` with `legacy_errors`).

Why a hand-written HTTP/1.1 server on asyncio + httptools instead of aiohttp.web or an ASGI
app: the simulator is the upstream of the gateway's overhead benchmark and must not be its
bottleneck. Measured on this machine (one core, 64 keep-alive connections, latency 0,
non-streamed chat): the raw protocol serves several times the requests/s of aiohttp.web and
of uvicorn with a raw ASGI app (numbers in docs/benchmarks.md). The server only speaks what
OpenAI clients send (HTTP/1.1, keep-alive, Content-Length bodies; chunked request bodies
are parsed by httptools too) and is not meant to face the internet.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import os
import random
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, cast

import httptools
import orjson

from engines.base import EngineContext, SpecIssue
from engines.openai_http import OpenAIEngine
from engines.spec import ModelSpec

__all__ = ["SimConfig", "SimEngine", "SimServer", "serve_main"]

FINGERPRINT = "gateway-sim"

DEFAULT_WORDS: tuple[str, ...] = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "simulated",
    "tokens",
    "keep",
    "flowing",
    "at",
    "steady",
    "pace",
)


@dataclass(slots=True)
class SimConfig:
    """What one simulator server does. Every field is also a `--flag` of `serve_main` and
    an `options:` key of a models.yaml entry with `engine: sim`."""

    model: str = "sim-model"
    # Latency: time to first token and the gap between tokens, in milliseconds.
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    # Relative spread of every latency draw (0 = exact), and its distribution.
    jitter: float = 0.0
    jitter_dist: Literal["uniform", "lognormal"] = "uniform"
    # Sequences generating at once; more wait in a FIFO queue (0 = unlimited).
    max_running: int = 0
    # Output length when a request gives no max_tokens.
    output_tokens: int = 16
    words: tuple[str, ...] = DEFAULT_WORDS
    max_model_len: int = 2048
    embedding_dim: int = 64
    # KV-cache capacity in tokens: vllm:kv_cache_usage_perc = tokens held / this.
    kv_cache_tokens: int = 65536
    # Speculative decoding counters (0 = not configured): draft length and acceptance rate.
    spec_tokens: int = 0
    spec_acceptance: float = 0.7
    # Adapters loaded at start (vLLM's --lora-modules name=path).
    lora_modules: dict[str, str] = field(default_factory=dict)
    # Requests to /v1/* must carry `Authorization: Bearer <api_key>` (vLLM's --api-key).
    api_key: str | None = None
    legacy_errors: bool = False
    seed: int | None = 0
    # ---- fault injection (each applies to a request with probability *_rate)
    error_rate: float = 0.0
    error_status: int = 500
    # No bytes for stall_ms after `stall_after` chunks (0 = before the response headers).
    stall_ms: float = 0.0
    stall_after: int = 0
    stall_rate: float = 1.0
    # Close the connection after `drop_after` token chunks (0 = before the response headers;
    # chat's role chunk is sent with the first token and not counted).
    drop_after: int | None = None
    drop_rate: float = 1.0
    # /health answers 503 (and generation 503) for this long after start.
    startup_s: float = 0.0

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            key, msg = problems[0]
            raise ValueError(f"{key}: {msg}")


def config_problems(c: SimConfig) -> list[tuple[str, str]]:
    """(field, message) for every out-of-range value; shared by SimConfig and check_spec."""
    out: list[tuple[str, str]] = []
    for key in ("ttft_ms", "itl_ms", "jitter", "stall_ms", "startup_s"):
        if getattr(c, key) < 0:
            out.append((key, "must be ≥ 0"))
    for key in ("error_rate", "stall_rate", "drop_rate", "spec_acceptance"):
        if not 0.0 <= getattr(c, key) <= 1.0:
            out.append((key, "must be between 0 and 1"))
    for key in ("output_tokens", "embedding_dim", "kv_cache_tokens", "max_model_len"):
        if getattr(c, key) < 1:
            out.append((key, "must be ≥ 1"))
    for key in ("max_running", "spec_tokens", "stall_after"):
        if getattr(c, key) < 0:
            out.append((key, "must be ≥ 0"))
    if c.drop_after is not None and c.drop_after < 0:
        out.append(("drop_after", "must be ≥ 0"))
    if not 400 <= c.error_status <= 599:
        out.append(("error_status", "must be an HTTP error status (400-599)"))
    if c.jitter_dist not in ("uniform", "lognormal"):
        out.append(("jitter_dist", "must be uniform or lognormal"))
    if not c.words:
        out.append(("words", "must not be empty"))
    return out


# --------------------------------------------------------------------------- wire helpers

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
# vLLM's error `type` for a status (its HTTPStatus → exception-name mapping).
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "TimeoutError",
    413: "BadRequestError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nserver: gateway-sim\r\n\r\n"
)
_DONE_CHUNK = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


def _head(status: int, ctype: bytes, length: int, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nserver: gateway-sim\r\n%s\r\n"
        % (status, _REASONS.get(status, b"Error"), ctype, length, extra)
    )


class _HttpError(Exception):
    """A request the simulator answers with an error envelope (vLLM's shape)."""

    def __init__(self, status: int, message: str, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _ERROR_TYPES.get(status, "InternalServerError")


def _count_words(value: Any) -> int:
    """Deterministic 'prompt tokens': words of every string, length of token-id lists."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_words(value.get(k)) for k in ("content", "text"))
    return 0


class _Slots:
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


# --------------------------------------------------------------------------- the server


class SimServer:
    """A simulator server. In process (tests)::

        server = SimServer(SimConfig(model="m", itl_ms=5))
        url = await server.start("127.0.0.1", 0)   # "http://127.0.0.1:PORT"
        ...
        await server.stop()

    `running`, `waiting` and `adapters` expose the same figures as `/metrics` and
    `/v1/models`."""

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or SimConfig(), **overrides)
        c = self.config
        self._rng = random.Random(c.seed)
        self._slots = _Slots(c.max_running)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self.adapters: dict[str, str] = dict(c.lora_modules)
        self.url = ""
        self._started_at = 0.0
        self._created = int(time.time())
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex().encode()
        # Precomputed token texts: JSON-encoded for chunks, plain for whole responses.
        self._tokens = [" " + w for w in c.words]
        self._tok_json = [orjson.dumps(t) for t in self._tokens]
        self._text_cache: dict[tuple[int, int], str] = {}
        self._model_json: dict[str, bytes] = {}
        self._auth = b"Bearer " + c.api_key.encode() if c.api_key else None
        self._zero_latency = c.ttft_ms == 0 and c.itl_ms == 0
        self._faulty = bool(c.error_rate or c.stall_ms or c.drop_after is not None)
        # Metrics.
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec_drafts_total = 0
        self.spec_draft_tokens_total = 0
        self.spec_accepted_total = 0
        self.requests_total = 0
        self._kv_tokens = 0

    # ---- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._server = await loop.create_server(
            lambda: _Conn(self), host, port, backlog=4096, reuse_address=True
        )
        sock = self._server.sockets[0]
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.abort()
        await self._server.wait_closed()
        self._server = None

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

    def _text(self, offset: int, n: int) -> str:
        key = (offset, n)
        text = self._text_cache.get(key)
        if text is None:
            toks, w = self._tokens, len(self._tokens)
            text = "".join(toks[(offset + k) % w] for k in range(n))
            if len(self._text_cache) < 4096:
                self._text_cache[key] = text
        return text

    def _mjson(self, model: str) -> bytes:
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


@dataclass(slots=True)
class _Gen:
    """One parsed generation request."""

    chat: bool
    stream: bool
    model: str
    n: int
    n_out: int
    prompt_tokens: int
    include_usage: bool
    finish: bytes  # JSON of the last chunk's finish_reason (+ stop_reason)


class _Conn(asyncio.Protocol):
    """One client connection: httptools parses, requests are answered in order."""

    def __init__(self, server: SimServer) -> None:
        self.s = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.auth: bytes | None = None
        self.req_id: bytes | None = None
        self.pending: deque[tuple[bytes, bytes, bytes, bytes | None, bytes | None, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closed = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.s._conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.s._conns.discard(self)
        # The client went away: stop generating at once (frees the running slot).
        if self.task is not None:
            self.task.cancel()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write_simple(400, _TEXT, b"bad request", keep_alive=False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.auth = None
        self.req_id = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"authorization":
            self.auth = value
        elif n == b"x-request-id":
            self.req_id = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = (
            self.parser.get_method(),
            self.url,
            b"".join(self.body),
            self.auth,
            self.req_id,
            self.parser.should_keep_alive(),
        )
        if self.task is None and not self.pending:
            self.dispatch(*req)
        else:
            self.pending.append(req)

    # ---- writing

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.paused and not self.closed:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter

    def finish(self, keep_alive: bool) -> None:
        if not keep_alive and self.transport is not None:
            self.transport.close()

    def write_simple(
        self, status: int, ctype: bytes, body: bytes, keep_alive: bool = True, extra: bytes = b""
    ) -> None:
        if not keep_alive:
            extra += b"connection: close\r\n"
        self.write(_head(status, ctype, len(body), extra) + body)
        self.finish(keep_alive)

    def write_error(self, err: _HttpError, keep_alive: bool) -> None:
        extra = b"retry-after: 1\r\n" if err.status in (429, 503) else b""
        body = self.s.error_body(err.status, err.message, err.err_type)
        self.write_simple(err.status, _JSON, body, keep_alive, extra)

    # ---- routing

    def dispatch(
        self,
        method: bytes,
        url: bytes,
        body: bytes,
        auth: bytes | None,
        req_id: bytes | None,
        keep_alive: bool,
    ) -> None:
        s = self.s
        path = url.split(b"?", 1)[0]
        try:
            if path.startswith(b"/v1/"):
                if s._auth is not None and auth != s._auth:
                    # vLLM's --api-key middleware answers exactly this.
                    self.write_simple(401, _JSON, b'{"error":"Unauthorized"}', keep_alive)
                    return
                if method != b"POST" and path != b"/v1/models":
                    raise _HttpError(405, "Method Not Allowed")
                if path == b"/v1/chat/completions":
                    self.generate(True, body, req_id, keep_alive)
                elif path == b"/v1/completions":
                    self.generate(False, body, req_id, keep_alive)
                elif path == b"/v1/embeddings":
                    self.write_simple(200, _JSON, self.embeddings(body), keep_alive)
                elif path == b"/v1/models":
                    self.write_simple(200, _JSON, s.models_body(), keep_alive)
                elif path == b"/v1/load_lora_adapter":
                    self.write_simple(200, _TEXT, self.load_lora(body), keep_alive)
                elif path == b"/v1/unload_lora_adapter":
                    self.write_simple(200, _TEXT, self.unload_lora(body), keep_alive)
                else:
                    self.write_simple(404, _JSON, b'{"detail":"Not Found"}', keep_alive)
            elif path == b"/health":
                if s._starting():
                    self.write_simple(503, _TEXT, b"starting", keep_alive)
                else:
                    self.write_simple(200, _TEXT, b"", keep_alive)
            elif path == b"/metrics":
                self.write_simple(200, b"text/plain; version=0.0.4", s.metrics_text(), keep_alive)
            elif path == b"/version":
                self.write_simple(200, _JSON, b'{"version":"gateway-sim"}', keep_alive)
            else:
                self.write_simple(404, _JSON, b'{"detail":"Not Found"}', keep_alive)
        except _HttpError as err:
            self.write_error(err, keep_alive)

    def next_pending(self) -> None:
        self.task = None
        while self.pending and self.task is None and not self.closed:
            self.dispatch(*self.pending.popleft())

    # ---- LoRA runtime API (vLLM's messages and statuses)

    def load_lora(self, body: bytes) -> bytes:
        req = self.json_body(body)
        name, path = req.get("lora_name"), req.get("lora_path")
        if not name or not path:
            raise _HttpError(
                400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if name in self.s.adapters:
            raise _HttpError(
                400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
            )
        self.s.adapters[str(name)] = str(path)
        return f"Success: LoRA adapter '{name}' added successfully.".encode()

    def unload_lora(self, body: bytes) -> bytes:
        req = self.json_body(body)
        name = req.get("lora_name")
        if not name:
            raise _HttpError(
                400,
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                "InvalidUserInput",
            )
        if name not in self.s.adapters:
            raise _HttpError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.s.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully.".encode()

    # ---- embeddings

    def embeddings(self, body: bytes) -> bytes:
        s = self.s
        req = self.json_body(body)
        model = self.check_model(req)
        inputs = req.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise _HttpError(400, "'input' must be a string or a non-empty list.")
        b64 = req.get("encoding_format") == "base64"
        dim = s.config.embedding_dim
        data, prompt = [], 0
        for i, item in enumerate(inputs):
            prompt += _count_words(item)
            seed = hashlib.blake2b(orjson.dumps(item), digest_size=8).digest()
            rng = random.Random(seed)
            vec = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            vec = [v / norm for v in vec]
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        s.prompt_tokens_total += prompt
        return orjson.dumps(
            {
                "id": "embd-" + s.new_id(self.req_id).decode(),
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0},
            }
        )

    # ---- generation

    @staticmethod
    def json_body(body: bytes) -> dict[str, Any]:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _HttpError(400, "The request body is not valid JSON.") from None
        if not isinstance(req, dict):
            raise _HttpError(400, "The request body must be a JSON object.")
        return req

    def check_model(self, req: dict[str, Any]) -> str:
        s = self.s
        model = req.get("model") or s.config.model
        if model != s.config.model and model not in s.adapters:
            raise _HttpError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return str(model)

    def parse_gen(self, chat: bool, body: bytes) -> _Gen:
        s = self.s
        c = s.config
        req = self.json_body(body)
        model = self.check_model(req)
        if chat:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _HttpError(400, "'messages' must be a non-empty list.")
            prompt_tokens = _count_words(messages)
        else:
            if "prompt" not in req:
                raise _HttpError(400, "'prompt' is required.")
            prompt_tokens = _count_words(req["prompt"])
        prompt_tokens = max(1, prompt_tokens)
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
        if max_tokens is None:
            n_out, finish = c.output_tokens, b'"stop","stop_reason":null'
        else:
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise _HttpError(400, f"max_tokens must be at least 1, got {max_tokens!r}.")
            n_out, finish = max_tokens, b'"length","stop_reason":null'
        if prompt_tokens + n_out > c.max_model_len:
            raise _HttpError(
                400,
                f"This model's maximum context length is {c.max_model_len} tokens. However, "
                f"you requested {prompt_tokens + n_out} tokens ({prompt_tokens} in the "
                f"messages, {n_out} in the completion). Please reduce the length of the "
                "messages or completion.",
            )
        n = req.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 128:
            raise _HttpError(400, "n must be between 1 and 128.")
        opts = req.get("stream_options")
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        return _Gen(
            chat, bool(req.get("stream")), model, n, n_out, prompt_tokens, include_usage, finish
        )

    def generate(self, chat: bool, body: bytes, req_id: bytes | None, keep_alive: bool) -> None:
        s = self.s
        if s._starting():
            raise _HttpError(503, "The simulator is starting.")
        if s._faulty and s._hit(s.config.error_rate):
            raise _HttpError(
                s.config.error_status, f"simulated fault (error_rate={s.config.error_rate})"
            )
        g = self.parse_gen(chat, body)
        rid = s.new_id(req_id)
        # Fast path: nothing to wait for, so answer now without a task.
        if s._zero_latency and not s._faulty and s._slots.try_acquire():
            try:
                s.prompt_tokens_total += g.prompt_tokens
                self.write_all(g, rid, keep_alive)
            finally:
                s._slots.release()
            return
        self.task = asyncio.get_running_loop().create_task(self.run_gen(g, rid, keep_alive))
        self.task.add_done_callback(lambda _t: self.next_pending())

    def templates(self, g: _Gen, rid: bytes) -> tuple[bytes, bytes]:
        """(head of every chunk up to `"choices":[`, JSON id) for this request."""
        created = b"%d" % int(time.time())
        if g.chat:
            full_id, obj = b"chatcmpl-" + rid, b"chat.completion.chunk"
        else:
            full_id, obj = b"cmpl-" + rid, b"text_completion"
        head = (
            b'data: {"id":"'
            + full_id
            + b'","object":"'
            + obj
            + b'","created":'
            + created
            + b',"model":'
            + self.s._mjson(g.model)
            + b',"system_fingerprint":"gateway-sim","choices":['
        )
        return head, full_id

    def token_events(self, g: _Gen, head: bytes, step: int, first: bool) -> bytes:
        """The SSE events of output token `step` for every choice (one token per chunk)."""
        toks = self.s._tok_json
        w = len(toks)
        fin = g.finish if step == g.n_out - 1 else b"null"
        parts = []
        for i in range(g.n):
            tok = toks[(i + step) % w]
            if g.chat:
                if first:
                    parts.append(
                        head + b'{"index":%d,"delta":{"role":"assistant","content":""},'
                        b'"logprobs":null,"finish_reason":null}]}\n\n' % i
                    )
                parts.append(
                    head + b'{"index":%d,"delta":{"content":%s},"logprobs":null,'
                    b'"finish_reason":%s}]}\n\n' % (i, tok, fin)
                )
            else:
                parts.append(
                    head
                    + b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}]}\n\n'
                    % (i, tok, fin)
                )
        return b"".join(parts)

    def usage_event(self, g: _Gen, head: bytes) -> bytes:
        c = g.n_out * g.n
        usage = b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
        return head + usage % (g.prompt_tokens, g.prompt_tokens + c, c)

    def whole_body(self, g: _Gen, full_id: bytes) -> bytes:
        finish = "length" if g.finish.startswith(b'"length"') else "stop"
        choices: list[dict[str, Any]] = []
        for i in range(g.n):
            text = self.s._text(i, g.n_out)
            if g.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                )
        c = g.n_out * g.n
        return orjson.dumps(
            {
                "id": full_id.decode(),
                "object": "chat.completion" if g.chat else "text_completion",
                "created": int(time.time()),
                "model": g.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": g.prompt_tokens,
                    "total_tokens": g.prompt_tokens + c,
                    "completion_tokens": c,
                },
                "system_fingerprint": FINGERPRINT,
            }
        )

    def account(self, g: _Gen) -> None:
        s = self.s
        s.generation_tokens_total += g.n_out * g.n
        s.requests_total += 1
        s.count_spec(g.n_out * g.n)

    def write_all(self, g: _Gen, rid: bytes, keep_alive: bool) -> None:
        """The zero-latency answer, written at once."""
        head, full_id = self.templates(g, rid)
        self.account(g)
        if not g.stream:
            self.write_simple(200, _JSON, self.whole_body(g, full_id), keep_alive)
            return
        events = [self.token_events(g, head, k, k == 0) for k in range(g.n_out)]
        if g.include_usage:
            events.append(self.usage_event(g, head))
        payload = b"".join(events)
        self.write(_STREAM_HEAD + b"%x\r\n" % len(payload) + payload + b"\r\n" + _DONE_CHUNK)
        self.finish(keep_alive)

    async def run_gen(self, g: _Gen, rid: bytes, keep_alive: bool) -> None:
        s = self.s
        c = s.config
        loop = asyncio.get_running_loop()
        stall = c.stall_ms > 0 and s._hit(c.stall_rate)
        drop_at = c.drop_after if c.drop_after is not None and s._hit(c.drop_rate) else None
        await s._slots.acquire()
        held = g.prompt_tokens
        s._kv_tokens += held
        s.prompt_tokens_total += g.prompt_tokens
        try:
            if (stall and c.stall_after == 0) or drop_at == 0:
                if stall and c.stall_after == 0:
                    await asyncio.sleep(c.stall_ms / 1000)
                if drop_at == 0:
                    self.abort_now()
                    return
            t = loop.time() + s._draw(c.ttft_ms / 1000)
            itl = c.itl_ms / 1000
            head, full_id = self.templates(g, rid)
            if g.stream:
                self.write(_STREAM_HEAD)
            for step in range(g.n_out):
                if step:
                    t += s._draw(itl)
                delay = t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                s.generation_tokens_total += g.n
                s._kv_tokens += g.n
                held += g.n
                if not g.stream:
                    continue
                ev = self.token_events(g, head, step, step == 0)
                self.write(b"%x\r\n" % len(ev) + ev + b"\r\n")
                await self.drain()
                sent = step + 1
                if stall and sent == c.stall_after:
                    await asyncio.sleep(c.stall_ms / 1000)
                    t = loop.time()
                if drop_at is not None and sent >= drop_at:
                    # Cut mid-stream: the chunked body never terminates.
                    if self.transport is not None:
                        self.transport.close()
                    return
            s.requests_total += 1
            s.count_spec(g.n_out * g.n)
            if not g.stream:
                self.write_simple(200, _JSON, self.whole_body(g, full_id), keep_alive)
                return
            tail = self.usage_event(g, head) if g.include_usage else b""
            if tail:
                self.write(b"%x\r\n" % len(tail) + tail + b"\r\n")
            self.write(_DONE_CHUNK)
            self.finish(keep_alive)
        finally:
            s._kv_tokens -= held
            s._slots.release()

    def abort_now(self) -> None:
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- standalone

_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "model": (str, "model name served"),
    "ttft_ms": (float, "time to first token (ms)"),
    "itl_ms": (float, "inter-token latency (ms)"),
    "jitter": (float, "relative spread of latencies, e.g. 0.2"),
    "jitter_dist": (str, "uniform | lognormal"),
    "max_running": (int, "max running sequences, more queue FIFO (0 = unlimited)"),
    "output_tokens": (int, "output tokens when a request gives no max_tokens"),
    "max_model_len": (int, "context length"),
    "embedding_dim": (int, "embedding vector size"),
    "kv_cache_tokens": (int, "KV-cache capacity in tokens (for vllm:kv_cache_usage_perc)"),
    "spec_tokens": (int, "speculative draft length for spec-decode counters (0 = off)"),
    "spec_acceptance": (float, "speculative acceptance rate 0..1"),
    "api_key": (str, "require this bearer key on /v1/*"),
    "seed": (int, "random seed for jitter and fault draws"),
    "error_rate": (float, "fraction of requests answered with --error-status"),
    "error_status": (int, "status of injected errors"),
    "stall_ms": (float, "stall this long (no bytes)"),
    "stall_after": (int, "chunks before the stall (0 = before headers)"),
    "stall_rate": (float, "fraction of requests that stall"),
    "drop_after": (int, "drop the connection after this many chunks"),
    "drop_rate": (float, "fraction of requests dropped"),
    "startup_s": (float, "/health answers 503 for this long"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway sim",
        description="vLLM-compatible SIMULATOR for tests and benchmarks (no real model).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for key, (typ, help_) in _FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None, help=help_)
    p.add_argument("--words", default=None, help="comma-separated output words")
    p.add_argument("--legacy-errors", action="store_true", help="old flat vLLM error shape")
    p.add_argument(
        "--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters at start"
    )
    return p


def config_from_args(argv: list[str]) -> tuple[SimConfig, str, int]:
    args = _parser().parse_args(argv)
    kw: dict[str, Any] = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.words:
        kw["words"] = tuple(w for w in args.words.split(",") if w)
    if args.legacy_errors:
        kw["legacy_errors"] = True
    mods = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--lora-modules: expected NAME=PATH, got {item!r}")
        mods[name] = path
    kw["lora_modules"] = mods
    try:
        return SimConfig(**kw), args.host, args.port
    except ValueError as e:
        raise SystemExit(f"gateway sim: {e}") from None


async def _serve(config: SimConfig, host: str, port: int) -> None:
    server = SimServer(config)
    url = await server.start(host, port)
    c = config
    print(
        f"gateway-sim: vLLM-compatible SIMULATOR (not a real model) serving {c.model!r} at "
        f"{url}  ttft={c.ttft_ms}ms itl={c.itl_ms}ms jitter={c.jitter} "
        f"max_running={c.max_running or 'unlimited'}"
        + (f" FAULTS error_rate={c.error_rate}" if c.error_rate else "")
        + (f" stall_ms={c.stall_ms}" if c.stall_ms else "")
        + (f" drop_after={c.drop_after}" if c.drop_after is not None else ""),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def serve_main(argv: list[str]) -> int:
    """Run a simulator server until SIGINT/SIGTERM (`gateway sim ...`)."""
    config, host, port = config_from_args(argv)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    runner(_serve(config, host, port))
    return 0


# --------------------------------------------------------------------------- the engine

_SIM_OPTIONS = {f.name for f in fields(SimConfig)} - {"model"}


class SimEngine(OpenAIEngine):
    """Engine "sim": launches `replicas` simulator servers on loopback in this process and
    relays to them like any OpenAI-compatible upstream. `options:` take SimConfig's fields
    (ttft_ms, itl_ms, jitter, ...) besides OpenAIEngine's own options; `batching.max_sequences`
    sets `max_running` when given, `speculative.num_speculative_tokens` turns on the
    spec-decode counters."""

    serve_main: ClassVar[Callable[[list[str]], int]] = staticmethod(serve_main)

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        self._servers: list[SimServer] = []

    @classmethod
    def sim_config(cls, spec: ModelSpec) -> SimConfig:
        kw = {k: v for k, v in spec.options.items() if k in _SIM_OPTIONS}
        if "words" in kw:
            kw["words"] = tuple(kw["words"])
        if "max_running" not in kw and "batching" in spec.model_fields_set:
            kw["max_running"] = spec.batching.max_sequences
        if "spec_tokens" not in kw and spec.speculative is not None:
            kw["spec_tokens"] = spec.speculative.num_speculative_tokens
        if "max_model_len" not in kw:
            kw["max_model_len"] = spec.max_model_len
        return SimConfig(model=spec.upstream_name, **kw)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues: list[SpecIssue] = []
        if spec.endpoints:
            issues.append(
                SpecIssue(
                    path="endpoints",
                    message="the sim engine launches its own servers; to attach to a running "
                    "simulator use engine: openai",
                )
            )
        if spec.engine_args:
            issues.append(SpecIssue(path="engine_args", message="not used by the sim engine"))
        known = _SIM_OPTIONS | set(cls.OPTIONS)
        for key in spec.options:
            if key not in known:
                issues.append(
                    SpecIssue(
                        path=f"options.{key}",
                        message=f"unknown sim option; known: {', '.join(sorted(known))}",
                    )
                )
        issues += cls.check_options(spec)
        if not issues:
            try:
                cfg = cls.sim_config(spec)
            except (TypeError, ValueError) as e:
                msg = str(e)
                key = msg.split(":", 1)[0] if ":" in msg else ""
                issues.append(SpecIssue(path=f"options.{key}" if key else "options", message=msg))
            else:
                for key, msg in config_problems(cfg):
                    issues.append(SpecIssue(path=f"options.{key}", message=msg))
        return issues

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        return []  # in process: nothing is launched as a command

    async def start_workers(self) -> list[str]:
        config = self.sim_config(self.spec)
        for i in range(self.spec.replicas):
            server = SimServer(
                replace(config, seed=None if config.seed is None else config.seed + i)
            )
            self._servers.append(server)
            await server.start("127.0.0.1", 0)
        self.progress(
            f"sim: {len(self._servers)} SIMULATOR server(s) for {self.spec.name!r} at "
            + ", ".join(s.url for s in self._servers)
        )
        return [s.url for s in self._servers]

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            servers, self._servers = self._servers, []
            for server in servers:
                await server.stop()

    @property
    def servers(self) -> list[SimServer]:
        return list(self._servers)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve_main(sys.argv[1:]))
