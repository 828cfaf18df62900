"""engines.upstream.http1 against real loopback servers: the simulator, and small asyncio servers in
this file that misbehave on purpose (close mid-body, close an idle keep-alive connection,
odd chunk boundaries, a response in 1-byte pieces, stalls, bodies delimited by close)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import uvloop

from engines.upstream import http1
from simulator import SimConfig, SimServer

MODEL = "sim-m"
MSGS = [{"role": "user", "content": "hello there"}]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chat_request(pool: http1.Pool, stream: bool = False, max_tokens: int = 3) -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": MSGS,
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    data = orjson.dumps(body)
    head = pool.request_head("POST", "/v1/chat/completions", {"Content-Type": "application/json"})
    return head + b"X-Request-Id: r1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


def get_request(pool: http1.Pool, path: str = "/") -> bytes:
    return pool.request_head("GET", path, {}) + b"\r\n"


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    s = SimServer(SimConfig(model=MODEL, seed=0))
    await s.start()
    yield s
    await s.stop()


class RawServer:
    """An asyncio server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            w.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def read_request(r: asyncio.StreamReader) -> bytes:
    """One request's head and Content-Length body."""
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await r.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# ---------------------------------------------------------------- against the simulator


async def test_fetch_keeps_alive_and_reuses_lifo(sim: SimServer) -> None:
    pool = http1.Pool(sim.url)
    try:
        r = await pool.fetch(chat_request(pool))
        assert r.status == 200 and r.header(b"content-type") == b"application/json"
        obj = orjson.loads(r.body)
        assert obj["id"] == "chatcmpl-r1" and obj["usage"]["completion_tokens"] == 3
        for _ in range(5):
            assert (await pool.fetch(chat_request(pool))).status == 200
        assert (pool.open_count, pool.idle_count) == (1, 1)
        # Concurrency opens connections as needed (no limit); all come back to the pool.
        out = await asyncio.gather(*(pool.fetch(chat_request(pool)) for _ in range(8)))
        assert {o.status for o in out} == {200}
        assert pool.idle_count == pool.open_count >= 2
        last = pool._idle[-1]
        await pool.fetch(chat_request(pool))
        assert pool._idle[-1] is last  # the most recently used one went out and came back
    finally:
        pool.close()


async def test_stream_chunked_sse(sim: SimServer) -> None:
    pool = http1.Pool(sim.url)
    try:
        s = await pool.stream(chat_request(pool, stream=True, max_tokens=4))
        assert s.status == 200 and (s.header(b"content-type") or b"").startswith(
            b"text/event-stream"
        )
        body = b""
        while data := await s.read_chunk():
            body += data
        s.release()
        assert body.endswith(b"data: [DONE]\n\n") and body.count(b'"content":" ') == 4
        assert pool.idle_count == 1
        s.release()  # idempotent
        s.close()  # a late close never hits the connection's next request
        assert pool.idle_count == 1
        # Error answers come through the same way.
        s = await pool.stream(get_request(pool, "/nope"))
        assert s.status == 404 and b"Not Found" in await s.read()
        s.release()
        assert pool.idle_count == 1
    finally:
        pool.close()


async def test_early_release_closes_and_upstream_stops() -> None:
    sim = SimServer(SimConfig(model=MODEL, itl_ms=20, output_tokens=200))
    await sim.start()
    pool = http1.Pool(sim.url)
    try:
        s = await pool.stream(chat_request(pool, stream=True, max_tokens=200))
        assert await s.read_chunk()
        assert sim.running == 1
        s.release()  # not read to its end: closed, never pooled
        assert (pool.open_count, pool.idle_count) == (0, 0)
        await _eventually(lambda: sim.running == 0)
        # A cancelled fetch closes its connection too.
        task = asyncio.create_task(pool.fetch(chat_request(pool, max_tokens=200)))
        await _eventually(lambda: sim.running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_count == 0
        await _eventually(lambda: sim.running == 0)
    finally:
        pool.close()
        await sim.stop()


async def test_drain_abandoned_reads_what_the_worker_sent_until_it_stops() -> None:
    """A consumer that gives up mid-stream half-closes: the worker (the simulator, as
    uvicorn and vLLM do) reads that as the client's close and stops; every event it wrote
    before that comes back for counting, and nothing is pooled."""
    sim = SimServer(SimConfig(model=MODEL, itl_ms=5, output_tokens=400))
    await sim.start()
    pool = http1.Pool(sim.url)
    try:
        s = await pool.stream(chat_request(pool, stream=True, max_tokens=400))
        got = await s.read_chunk()
        await asyncio.sleep(0.05)  # the worker goes on writing; nobody reads
        before = sim.generation_tokens_total
        rest = await s.drain_abandoned(5.0)
        await _eventually(lambda: sim.running == 0)
        events = (got + rest).count(b'"content":" ')  # a token each (not the role event)
        # Every token the worker generated was sent in an event we now hold (one token
        # per event), except one it may have made after it wrote the last.
        assert before <= events <= sim.generation_tokens_total <= events + 1
        assert sim.generation_tokens_total < 400 and b"[DONE]" not in rest
        assert (pool.open_count, pool.idle_count) == (0, 0)
        s.release()
    finally:
        pool.close()
        await sim.stop()


async def test_drain_abandoned_cuts_a_worker_that_ignores_the_half_close() -> None:
    class IgnoresEOF(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.task: asyncio.Task[None] | None = None

        def data_received(self, data: bytes) -> None:
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self.stream())

        def eof_received(self) -> bool:
            eofs.append(1)
            return True  # keep the connection open and go on writing

        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(1)
            if self.task is not None:
                self.task.cancel()

        async def stream(self) -> None:
            self.t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")  # type: ignore[attr-defined]
            while True:
                ev = b'data: {"choices":[]}\n\n'
                self.t.write(b"%x\r\n%s\r\n" % (len(ev), ev))  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)

    eofs: list[int] = []
    lost: list[int] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(IgnoresEOF, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = http1.Pool(f"http://127.0.0.1:{port}")
    try:
        s = await pool.stream(get_request(pool))
        assert await s.read_chunk()
        rest = await s.drain_abandoned(0.3)
        assert rest.count(b"data: ") >= 1 and eofs == [1]
        await _eventually(lambda: lost == [1])  # cut by us at the bound
        assert pool.open_count == 0
        # Cancelled while it drains (the gateway stopping): closed all the same.
        s = await pool.stream(get_request(pool))
        assert await s.read_chunk()
        task = asyncio.create_task(s.drain_abandoned(30.0))
        await _eventually(lambda: eofs == [1, 1])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _eventually(lambda: lost == [1, 1])
        assert pool.open_count == 0
    finally:
        pool.close()
        server.close()


async def _eventually(cond: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- misbehaving servers


async def test_close_mid_body_is_a_protocol_error() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await w.drain()

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        with pytest.raises(http1.ProtocolError, match="mid-response"):
            await pool.fetch(get_request(pool))
        s = await pool.stream(get_request(pool))
        assert await s.read_chunk() == b"0123456789"
        with pytest.raises(http1.ProtocolError, match="mid-response"):
            await s.read_chunk()
        s.release()
        assert pool.open_count == 0
        pool.close()


async def test_stale_keepalive_connection_is_retried_once_fresh() -> None:
    """The server answers the first request on a connection, then closes it when the next
    one arrives (the keep-alive race); the pool retries on a fresh connection."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(ok(b"first"))
        await w.drain()
        await read_request(r)  # then close without answering

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        assert (await pool.fetch(get_request(pool))).body == b"first"
        assert pool.idle_count == 1
        assert (await pool.fetch(get_request(pool))).body == b"first"
        assert srv.connections == 2
        # On a fresh connection the same failure is not retried: Disconnected.
        pool.close()
        pool = http1.Pool(srv.url)

    async def slam(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)

    async with RawServer(slam) as srv:
        pool = http1.Pool(srv.url)
        with pytest.raises(http1.Disconnected):
            await pool.fetch(get_request(pool))
        with pytest.raises(http1.Disconnected):
            await pool.stream(get_request(pool))
        assert srv.connections == 2
        pool.close()


async def test_idle_connection_closed_by_server_leaves_the_pool() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(ok(b"x"))
        await w.drain()
        await asyncio.sleep(0.05)  # then close while idle

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        await pool.fetch(get_request(pool))
        assert pool.idle_count == 1
        await _eventually(lambda: pool.idle_count == 0)
        assert (await pool.fetch(get_request(pool))).body == b"x"
        pool.close()


async def test_idle_timeout_closes_pooled_connections(sim: SimServer) -> None:
    pool = http1.Pool(sim.url, idle_timeout=0.1)
    await pool.fetch(get_request(pool, "/health"))
    assert pool.idle_count == 1
    await _eventually(lambda: pool.open_count == 0)
    assert pool.idle_count == 0
    pool.close()


async def test_chunked_with_odd_boundaries() -> None:
    events = [b'data: {"i":%d}\n\n' % i for i in range(5)]
    wire = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r",
        b"\n\r\n" + b"%X" % len(events[0]),
        b";ext=1\r\n" + events[0][:7],
        events[0][7:] + b"\r",
        b"\n" + b"%x\r\n" % len(events[1] + events[2]) + events[1] + events[2] + b"\r\n",
        b"%x\r\n%s\r\n%x\r\n" % (len(events[3]), events[3], len(events[4])),
        events[4] + b"\r\n0\r\nX-Trailer: t\r\n",
        b"\r\n",
    ]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            for piece in wire:
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0.005)

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        s = await pool.stream(get_request(pool))
        got = []
        while data := await s.read_chunk():
            got.append(data)
        s.release()
        assert b"".join(got) == b"".join(events) and len(got) > 1
        assert pool.idle_count == 1
        r = await pool.fetch(get_request(pool))
        assert r.body == b"".join(events) and r.header(b"content-type") == b"text/event-stream"
        assert srv.connections == 1
        pool.close()


async def test_response_in_one_byte_pieces() -> None:
    body = b'{"ok":true,"text":"' + b"y" * 300 + b'"}'
    answer = ok(body, b"Content-Type: application/json\r\nRetry-After: 7\r\n")
    chunked = (
        b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\nRetry-After: 3\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for reply in (answer, chunked):
            await read_request(r)
            for i in range(len(reply)):
                w.write(reply[i : i + 1])
                await w.drain()
                if i % 50 == 0:
                    await asyncio.sleep(0)

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        r = await pool.fetch(get_request(pool))
        assert (r.status, r.body, r.header(b"retry-after")) == (200, body, b"7")
        s = await pool.stream(get_request(pool))
        assert (s.status, s.header(b"retry-after")) == (429, b"3")
        assert await s.read() == b"hello world"
        s.release()
        assert (pool.idle_count, srv.connections) == (1, 1)
        pool.close()


async def test_close_delimited_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of ")
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(b"it")
        await w.drain()

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        assert (await pool.fetch(get_request(pool))).body == b"all of it"
        s = await pool.stream(get_request(pool))
        assert await s.read() == b"all of it"
        s.release()
        assert pool.open_count == 0  # never pooled: the server closed it
        pool.close()


async def test_reset_ends_a_close_delimited_body_with_an_error() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart")
        await w.drain()
        await asyncio.sleep(0.05)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST, not FIN: the body is not complete

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        s = await pool.stream(get_request(pool))
        assert await s.read_chunk() == b"part"
        with pytest.raises(http1.ProtocolError, match="mid-response"):
            await s.read_chunk()
        s.release()
        pool.close()


async def test_stall_is_a_read_timeout_and_data_resets_it() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # a byte every 0.1 s: never silent for 0.25 s
            await asyncio.sleep(0.1)
            w.write(b"1\r\nx\r\n")
            await w.drain()
        await asyncio.sleep(5)

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url, read_timeout=0.25)
        s = await pool.stream(get_request(pool))
        t0 = time.monotonic()
        got = b""
        with pytest.raises(http1.ReadTimeout):
            while data := await s.read_chunk():
                got += data
        # Six bytes 0.1 s apart kept it alive past 0.25 s; then 0.25 s of silence ended it.
        assert got == b"x" * 6 and time.monotonic() - t0 >= 0.8
        s.release()
        assert pool.open_count == 0
        t0 = time.monotonic()
        with pytest.raises(http1.ReadTimeout):
            await pool.fetch(get_request(pool))  # silence before the headers
        assert time.monotonic() - t0 > 0.6  # the chunks kept resetting it
        pool.close()


async def test_first_byte_timeout_counts_until_the_first_body_bytes() -> None:
    """Headers at once, then silence: a stream with `first_byte_s` fails with
    FirstByteTimeout (though the read timeout is far off); one whose body starts in time
    runs past that deadline, and its connection then serves a stream without one."""
    replies = [b"", b"1\r\nx\r\n"]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while replies:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await w.drain()
            first = replies.pop(0)
            if not first:
                await asyncio.sleep(5)  # no body: the client gives up first
                return
            await asyncio.sleep(0.05)
            w.write(first)
            await w.drain()
            await asyncio.sleep(0.4)  # past the first-byte deadline, within the read timeout
            w.write(b"1\r\ny\r\n0\r\n\r\n")
            await w.drain()

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url, read_timeout=30)
        s = await pool.stream(get_request(pool), first_byte_s=0.3)
        assert s.status == 200
        with pytest.raises(http1.FirstByteTimeout):
            await s.read_chunk()
        s.release()
        assert pool.open_count == 0  # a failed stream closes its connection
        s = await pool.stream(get_request(pool), first_byte_s=0.3)
        assert await s.read() == b"xy"
        s.release()
        assert pool.idle_count == 1 and srv.connections == 2
        pool.close()


async def test_back_pressure_pauses_reading() -> None:
    total = 32 * 1024 * 1024
    sent = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        piece = b"z" * 65536
        while sent < total:
            w.write(piece)
            await w.drain()
            sent += len(piece)

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        s = await pool.stream(get_request(pool))
        await asyncio.sleep(0.3)
        assert sent < total // 2  # the reader paused; the server could not push it all
        n = 0
        while data := await s.read_chunk():
            n += len(data)
        assert n == total
        s.release()
        assert pool.idle_count == 1
        pool.close()


async def test_connect_errors() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = http1.Pool(f"http://127.0.0.1:{port}")
    with pytest.raises(http1.ConnectError, match="cannot connect"):
        await pool.fetch(get_request(pool))
    pool.close()
    with pytest.raises(ValueError):
        http1.Pool("ftp://x")


async def test_unsolicited_bytes_on_an_idle_connection_close_it() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(ok(b"a"))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(ok(b"b"))  # nobody asked
        await w.drain()
        await asyncio.sleep(1)

    async with RawServer(handler) as srv:
        pool = http1.Pool(srv.url)
        assert (await pool.fetch(get_request(pool))).body == b"a"
        await _eventually(lambda: pool.open_count == 0)
        pool.close()


async def test_request_head_and_path_prefix() -> None:
    pool = http1.Pool("http://user@example.test:8080/prefix/")
    head = pool.request_head("POST", "/v1/x", {"Authorization": "Bearer k"})
    assert head == (
        b"POST /prefix/v1/x HTTP/1.1\r\nHost: example.test:8080\r\nAuthorization: Bearer k\r\n"
    )
    with pytest.raises(ValueError, match="line break"):
        pool.request_head("GET", "/", {"X": "a\r\nInjected: 1"})
    assert http1.Pool("https://h").port == 443 and http1.Pool("https://h").ssl is not None


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(ok(b"secure"))
            await w.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    pool = http1.Pool(f"https://localhost:{port}", ssl=client_ctx)
    try:
        for _ in range(2):
            assert (await pool.fetch(get_request(pool))).body == b"secure"
        assert pool.open_count == 1
    finally:
        pool.close()
        server.close()


def test_on_uvloop() -> None:
    """The same client on uvloop: the simulator, a stream, a stale connection."""

    async def main() -> None:
        sim = SimServer(SimConfig(model=MODEL))
        await sim.start()
        pool = http1.Pool(sim.url)
        try:
            r = await pool.fetch(chat_request(pool))
            assert r.status == 200 and orjson.loads(r.body)["usage"]["completion_tokens"] == 3
            s = await pool.stream(chat_request(pool, stream=True))
            assert (await s.read()).endswith(b"data: [DONE]\n\n")
            s.release()
            assert pool.open_count == 1
            url = sim.url
            await sim.stop()
            await _eventually(lambda: pool.open_count == 0)
            with pytest.raises(http1.ConnectError):
                await pool.fetch(chat_request(pool))
            assert url
        finally:
            pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_engine_reuses_one_connection(sim: SimServer) -> None:
    """OpenAIEngine on this client: sequential requests, streamed or not, share one
    keep-alive connection (closing early is covered by test_openai_http_engine)."""
    from engines.base import GenerateRequest
    from engines.spec import ModelSpec
    from engines.upstream.engine import OpenAIEngine

    engine = OpenAIEngine(ModelSpec(name=MODEL, engine="openai", endpoints=[sim.url]))
    await engine.start()
    try:
        pool = engine._endpoints[0].pool
        assert pool is not None
        for stream in (False, True, False, True):
            body: dict[str, object] = {"model": MODEL, "messages": MSGS, "max_tokens": 3}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            req = GenerateRequest("chat", body, MODEL, None, "rid", 0)
            if stream:
                assert b"[DONE]" not in b"".join([b async for b in engine.stream(req)])
            else:
                assert (await engine.complete(req)).usage is not None
        assert (pool.open_count, pool.idle_count) == (1, 1)
    finally:
        await engine.stop()
