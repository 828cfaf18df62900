"""One client connection to the simulator: httptools parsing, dispatch, and generation on
the clock with fault injection.

Owns the asyncio protocol (keep-alive, pipelined requests answered in order, back-pressure,
cancel on disconnect), the route table, and `run_gen` (TTFT / inter-token pacing, stalls,
drops). Does not own response shapes or parsing of bodies (`simulator.behaviour`).

Why a hand-written HTTP/1.1 server on asyncio + httptools instead of aiohttp.web or an ASGI
app: the simulator is the upstream of the gateway's overhead benchmark and must not be its
bottleneck. Measured on this machine (one core, 64 keep-alive connections, latency 0,
non-streamed chat): the raw protocol serves several times the requests/s of aiohttp.web and
of uvicorn with a raw ASGI app (numbers in docs/benchmarks.md). The server only speaks what
OpenAI clients send (HTTP/1.1, keep-alive, Content-Length bodies; chunked request bodies
are parsed by httptools too) and is not meant to face the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from simulator import behaviour as b
from simulator.behaviour import Gen
from simulator.wire import DONE_CHUNK, JSON, STREAM_HEAD, TEXT, HttpError, head

if TYPE_CHECKING:
    from simulator.state import SimState


class Connection(asyncio.Protocol):
    """One client connection: httptools parses, requests are answered in order."""

    def __init__(self, server: SimState) -> None:
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
            self.write_simple(400, TEXT, b"bad request", keep_alive=False)

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
        elif n == b"traceparent":  # vLLM parents its spans to it; here it is only noted
            self.s.traceparents.append(value.decode("latin-1"))

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
        self.write(head(status, ctype, len(body), extra) + body)
        self.finish(keep_alive)

    def write_error(self, err: HttpError, keep_alive: bool) -> None:
        extra = b"retry-after: 1\r\n" if err.status in (429, 503) else b""
        body = self.s.error_body(err.status, err.message, err.err_type)
        self.write_simple(err.status, JSON, body, keep_alive, extra)

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
                    self.write_simple(401, JSON, b'{"error":"Unauthorized"}', keep_alive)
                    return
                if method != b"POST" and path != b"/v1/models":
                    raise HttpError(405, "Method Not Allowed")
                if path == b"/v1/chat/completions":
                    self.generate(True, body, req_id, keep_alive)
                elif path == b"/v1/completions":
                    self.generate(False, body, req_id, keep_alive)
                elif path == b"/v1/embeddings":
                    self.write_simple(200, JSON, b.embeddings(s, body, req_id), keep_alive)
                elif path == b"/v1/models":
                    self.write_simple(200, JSON, s.models_body(), keep_alive)
                elif path == b"/v1/load_lora_adapter":
                    if s.config.lora_load_ms:
                        self.task = asyncio.get_running_loop().create_task(
                            self.slow_load(body, keep_alive)
                        )
                        self.task.add_done_callback(lambda _t: self.next_pending())
                    else:
                        self.write_simple(200, TEXT, b.load_lora(s, body), keep_alive)
                elif path == b"/v1/unload_lora_adapter":
                    self.write_simple(200, TEXT, b.unload_lora(s, body), keep_alive)
                else:
                    self.write_simple(404, JSON, b'{"detail":"Not Found"}', keep_alive)
            elif path in (b"/tokenize", b"/detokenize"):
                # vLLM serves these outside /v1 (its --api-key guards only /v1).
                if method != b"POST":
                    raise HttpError(405, "Method Not Allowed")
                answer = b.tokenize if path == b"/tokenize" else b.detokenize
                self.write_simple(200, JSON, answer(s, body), keep_alive)
            elif path == b"/health":
                s.probes_total += 1
                if s.config.hang_health:
                    self.task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
                    self.task.add_done_callback(lambda _t: self.next_pending())
                elif s._starting():
                    self.write_simple(503, TEXT, b"starting", keep_alive)
                else:
                    self.write_simple(200, TEXT, b"", keep_alive)
            elif path == b"/metrics":
                s.scrapes_total += 1
                self.write_simple(200, b"text/plain; version=0.0.4", s.metrics_text(), keep_alive)
            elif path == b"/version":
                self.write_simple(200, JSON, b'{"version":"gateway-sim"}', keep_alive)
            else:
                self.write_simple(404, JSON, b'{"detail":"Not Found"}', keep_alive)
        except HttpError as err:
            self.write_error(err, keep_alive)

    def next_pending(self) -> None:
        self.task = None
        while self.pending and self.task is None and not self.closed:
            self.dispatch(*self.pending.popleft())

    def generate(self, chat: bool, body: bytes, req_id: bytes | None, keep_alive: bool) -> None:
        s = self.s
        s.received_total += 1
        if s._starting():
            raise HttpError(503, "The simulator is starting.")
        if s._faulty and s._hit(s.config.error_rate):
            raise HttpError(
                s.config.error_status, f"simulated fault (error_rate={s.config.error_rate})"
            )
        g = b.parse_gen(s, chat, body)
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

    def write_all(self, g: Gen, rid: bytes, keep_alive: bool) -> None:
        """The zero-latency answer, written at once."""
        head, full_id = b.templates(self.s, g, rid)
        b.account(self.s, g)
        if not g.stream:
            self.write_simple(200, JSON, b.whole_body(self.s, g, full_id), keep_alive)
            return
        per = self.s.config.tokens_per_chunk
        events = [
            b.token_events(self.s, g, head, k, k == 0, min(per, g.n_out - k))
            for k in range(0, g.n_out, per)
        ]
        if g.include_usage:
            events.append(b.usage_event(g, head))
        payload = b"".join(events)
        self.write(STREAM_HEAD + b"%x\r\n" % len(payload) + payload + b"\r\n" + DONE_CHUNK)
        self.finish(keep_alive)

    async def run_gen(self, g: Gen, rid: bytes, keep_alive: bool) -> None:
        s = self.s
        c = s.config
        loop = asyncio.get_running_loop()
        stall = c.stall_ms > 0 and s._hit(c.stall_rate)
        drop_at = c.drop_after if c.drop_after is not None and s._hit(c.drop_rate) else None
        await s._slots.acquire()
        held = g.prompt_tokens
        s._kv_tokens += held
        s.prompt_tokens_total += g.prompt_tokens
        unsent = 0  # tokens generated since the last delta written
        try:
            if (stall and c.stall_after == 0) or drop_at == 0:
                if stall and c.stall_after == 0:
                    await asyncio.sleep(c.stall_ms / 1000)
                if drop_at == 0:
                    self.abort_now()
                    return
            t = loop.time() + s._draw(c.ttft_ms / 1000) + g.prefill_s
            itl = c.itl_ms / 1000
            head, full_id = b.templates(self.s, g, rid)
            if g.stream:
                self.write(STREAM_HEAD)
            per, sent = c.tokens_per_chunk, 0
            for step in range(g.n_out):
                if step:
                    t += s._draw(itl)
                delay = t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                s.generation_tokens_total += g.n
                s._kv_tokens += g.n
                held += g.n
                unsent += g.n
                if not g.stream or ((step + 1) % per and step + 1 < g.n_out):
                    continue
                first = step - (step % per)
                ev = b.token_events(self.s, g, head, first, first == 0, step + 1 - first)
                self.write(b"%x\r\n" % len(ev) + ev + b"\r\n")
                unsent = 0
                await self.drain()
                sent += 1
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
                self.write_simple(200, JSON, b.whole_body(self.s, g, full_id), keep_alive)
                return
            tail = b.usage_event(g, head) if g.include_usage else b""
            if tail:
                self.write(b"%x\r\n" % len(tail) + tail + b"\r\n")
            self.write(DONE_CHUNK)
            self.finish(keep_alive)
        except asyncio.CancelledError:
            if g.stream:
                s.unsent_tokens_total += unsent
            raise
        finally:
            s._kv_tokens -= held
            s._slots.release()

    async def slow_load(self, body: bytes, keep_alive: bool) -> None:
        """An adapter load that takes `lora_load_ms` (the cost model)."""
        await asyncio.sleep(self.s.config.lora_load_ms / 1000)
        try:
            self.write_simple(200, TEXT, b.load_lora(self.s, body), keep_alive)
        except HttpError as err:
            self.write_error(err, keep_alive)

    def abort_now(self) -> None:
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- standalone
