"""`gateway.direct_body`: body blocks written straight onto uvicorn's connection arrive as
a valid chunked body, in order, also when the client stops reading (the writer declines
and uvicorn's `send` waits for the drain); and a gateway served without any wrapper around
`send` (so the relay takes the direct path, unlike the audited test servers) relays
streams the SDK reads whole."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import uvicorn

from gateway.app import create_app
from gateway.catalog import parse_catalog
from gateway.direct_body import body_writer, disconnect_notice
from gateway.server_limits import uvicorn_config
from gateway.settings import Settings
from simulator import SimConfig, SimServer
from tests.conftest import free_port
from tests.gateway.test_api_sim import SimThread
from tests.recording_upstream import RecordingUpstream

BLOCK = b"data: " + b"x" * 4000 + b"\n\n"
BLOCKS = 2000  # ~8 MB: far past the socket buffers, so a client that waits pauses writing


class Served:
    """An ASGI app under uvicorn with the gateway's protocol, nothing wrapping `send`."""

    def __init__(self, app: Any, settings: Settings):
        self.port = free_port()
        config = uvicorn_config(
            app, settings, host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve()), daemon=True
        )

    def __enter__(self) -> Served:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


class BlocksApp:
    """Streams BLOCKS numbered blocks through `body_writer` where it accepts them."""

    def __init__(self) -> None:
        self.had_writer: bool | None = None
        self.direct = 0
        self.declined = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        write = body_writer(send)
        self.had_writer = write is not None
        for i in range(BLOCKS):
            block = b"%06d" % i + BLOCK
            if write is not None and write(block):
                self.direct += 1
            else:
                self.declined += 1
                await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b"end", "more_body": False})


def _read_response(port: int, method: str, wait_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        time.sleep(wait_s)  # not reading: the server's writes back up
        parts = []
        s.settimeout(30)
        while data := s.recv(1 << 20):
            parts.append(data)
            joined = b"".join(parts)
            if joined.endswith(b"0\r\n\r\n") or (method == "HEAD" and b"\r\n\r\n" in joined):
                return joined
        return b"".join(parts)


def _dechunk(body: bytes) -> bytes:
    return b"".join(_chunks(body))


def test_direct_writes_stay_ordered_and_chunked_when_the_client_lags() -> None:
    app = BlocksApp()
    with Served(app, Settings()) as served:
        raw = _read_response(served.port, "POST", wait_s=1.0)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert app.had_writer is True
    assert app.direct > 0, "the direct path was never taken"
    assert app.declined > 0, "the client's lag never paused writing: the fallback untested"
    assert _dechunk(body) == b"".join(b"%06d" % i + BLOCK for i in range(BLOCKS)) + b"end"


def test_no_direct_writer_for_head_or_a_wrapped_send() -> None:
    app = BlocksApp()
    with Served(app, Settings()) as served:
        _read_response(served.port, "HEAD", wait_s=0.0)
    assert app.had_writer is False

    async def wrapped(message: Any) -> None: ...

    assert body_writer(wrapped) is None


_SIMS: dict[str, SimServer] = {}
LONG = 40_000  # tokens of ~150 bytes: ~6 MB, past the socket buffers


@pytest.fixture(scope="module")
def gateway(
    sims: SimThread, upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    sim = sims.start(model="m", itl_ms=1, output_tokens=40)
    # Tokens 50 us apart (2 s in all): the lagging-client case.
    slow = sims.start(model="slow", ttft_ms=5, itl_ms=50, output_tokens=200)
    bulk = sims.start(model="bulk", output_tokens=LONG, max_model_len=2 * LONG, itl_ms=0.05)
    tmp: Path = tmp_path_factory.mktemp("direct")
    models = [
        {"name": "m", "engine": "openai", "endpoints": [sim.url]},
        {"name": "slow", "engine": "openai", "endpoints": [slow.url]},
        {"name": "late_chunk", "engine": "openai", "endpoints": [upstream.url]},
        {"name": "bulk", "engine": "openai", "endpoints": [bulk.url], "max_model_len": 2 * LONG},
    ]
    catalog = parse_catalog({"models": models}, base_dir=tmp)
    settings = Settings(cache_dir=tmp)
    _SIMS["slow"] = slow
    try:
        with Served(create_app(settings, catalog), settings) as served:
            yield f"http://127.0.0.1:{served.port}/v1"
    finally:
        sims.call(sim.stop())
        sims.call(bulk.stop())
        sims.call(slow.stop())


def _blocks(base: str, model: str) -> dict[str, float]:
    """gateway_stream_blocks_total of `model`, by path."""
    text = httpx.get(base.removesuffix("/v1") + "/metrics").text
    out = {"direct": 0.0, "loop": 0.0}
    for line in text.splitlines():
        if line.startswith(f'gateway_stream_blocks_total{{model="{model}",'):
            path = line.split('path="', 1)[1].split('"', 1)[0]
            out[path] = float(line.rsplit(" ", 1)[1])
    return out


def test_unwrapped_gateway_relays_whole_streams(gateway: str) -> None:
    before = _blocks(gateway, "m")
    with openai.OpenAI(base_url=gateway, api_key="x", max_retries=0) as client:
        for include_usage in (False, True):
            chunks = list(
                client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=40,
                    stream=True,
                    stream_options={"include_usage": include_usage},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert len(text.split()) == 40
            finish = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert finish[-1] == "length"
            usage = [c.usage for c in chunks if c.usage is not None]
            if include_usage:
                assert len(usage) == 1 and usage[0].completion_tokens == 40
            else:
                assert usage == []
    # Chunks 1 ms apart reach the client from the upstream connection's callback (the
    # direct path); the first block and the usage chunk take the relay loop.
    after = _blocks(gateway, "m")
    assert after["direct"] - before["direct"] > 0
    assert after["loop"] - before["loop"] >= 4  # two streams, first and last block each


def test_direct_relay_keeps_order_when_the_client_lags(gateway: str) -> None:
    """A client that reads nothing for a second while ~6 MB of tokens arrive: the direct
    path's writes are declined once the client's socket is full, the loop takes over (and
    the upstream socket is paused), and every token still arrives once, in order."""
    words = [" " + w for w in SimConfig().words]
    assert len(set(words)) == len(words)
    index = {w: i for i, w in enumerate(words)}
    before = _blocks(gateway, "bulk")
    port = int(gateway.rsplit(":", 1)[1].split("/", 1)[0])
    body = orjson.dumps({"model": "bulk", "prompt": "hello", "max_tokens": LONG, "stream": True})
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # no receive autotuning
        s.connect(("127.0.0.1", port))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(1.0)
        s.settimeout(60)
        parts = []
        while data := s.recv(1 << 20):
            parts.append(data)
            if data.endswith(b"0\r\n\r\n") and b"".join(parts[-2:]).endswith(b"\r\n0\r\n\r\n"):
                break
    raw = b"".join(parts)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:600]
    events = [e for e in _dechunk(chunked).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    texts = [orjson.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert len(texts) == LONG
    for a, b in itertools.pairwise(texts):
        assert index[b] == (index[a] + 1) % len(words)
    after = _blocks(gateway, "bulk")
    assert after["direct"] - before["direct"] > 0, "the direct path was never taken"
    # The first block always goes by the loop; any more mean the direct writer declined (a
    # declined read may hold thousands of events now that reads of several go direct too).
    assert after["loop"] - before["loop"] >= 2, "the client's lag never declined a direct write"


class NoticeApp:
    """Registers a disconnect notice, then waits for the client to leave."""

    def __init__(self) -> None:
        self.registered: bool | None = None
        self.noticed = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        gone = asyncio.Event()

        def notice() -> None:
            self.noticed.set()
            gone.set()

        withdraw = disconnect_notice(send, notice)
        self.registered = withdraw is not None
        try:
            async with asyncio.timeout(30):
                await gone.wait()
        finally:
            if withdraw is not None:
                withdraw()


def test_the_connection_tells_of_a_client_leaving() -> None:
    app = NoticeApp()
    with Served(app, Settings()) as served:
        with socket.create_connection(("127.0.0.1", served.port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(30)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            deadline = time.monotonic() + 30
            while app.registered is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert not app.noticed.is_set()
        assert app.noticed.wait(30), "connection_lost did not notify"
    assert app.registered is True

    async def wrapped(message: Any) -> None: ...

    assert disconnect_notice(wrapped, lambda: None) is None  # not uvicorn's send: no notice


async def test_a_client_leaving_cancels_the_upstream(gateway: str) -> None:
    """Through the unwrapped gateway (the connection's notice, no watcher task): a stream
    and a non-streamed request whose clients leave are closed upstream at once."""
    slow = _SIMS["slow"]
    base = gateway.removesuffix("/v1")
    gone_before = _disconnects(base)
    body = {"model": "slow", "prompt": "hi", "max_tokens": 200, "stream": True}
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as r,
    ):
        async for _ in r.aiter_bytes():
            break
        assert slow.running == 1
    await _until(lambda: slow.running == 0, "the upstream stream was not closed")
    async with httpx.AsyncClient(base_url=base, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json={**body, "stream": False})
    await _until(lambda: slow.running == 0, "the upstream request was not closed")
    await _until(lambda: _disconnects(base) - gone_before == 2, "two disconnects counted")


def _disconnects(base: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith('gateway_client_disconnects_total{model="slow"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _until(cond: Any, what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_the_usage_chunk_goes_out_with_done_and_nothing_overtakes_it(gateway: str) -> None:
    """The relay holds the usage chunk for the final write with `[DONE]`; a chunk the
    upstream sends after it (against the contract) still comes after it, not around it
    through the direct path."""
    body = orjson.dumps(
        {
            "model": "late_chunk",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    port = int(gateway.rsplit(":", 1)[1].split("/", 1)[0])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        s.settimeout(30)
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = s.recv(65536)
            assert data, raw
            raw += data
    chunks = _chunks(raw.partition(b"\r\n\r\n")[2])
    events = [e for e in b"".join(chunks).split(b"\n\n") if e]
    kinds = [
        "done" if e == b"data: [DONE]" else "usage" if b'"usage"' in e else "content"
        for e in events
    ]
    assert kinds == ["content", "content", "usage", "content", "done"]
    # The late chunk went out with the usage chunk it followed (a direct write would
    # have been its own HTTP chunk, ahead of the held usage chunk).
    assert [c.count(b"\n\n") for c in chunks if c] == [1, 1, 2, 1]


def _chunks(body: bytes) -> list[bytes]:
    """The HTTP chunks of a chunked body, in order (each checked to end in CRLF)."""
    out, pos = [], 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        if size == 0:
            return out
        out.append(body[eol + 2 : eol + 2 + size])
        assert body[eol + 2 + size : eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size


def _raw_exchange(base: str, requests: list[bytes]) -> bytes:
    """Send `requests` pipelined on one connection; everything read until it closes."""
    host, port = base.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"".join(requests))
        s.settimeout(30)
        parts = []
        while data := s.recv(1 << 16):
            parts.append(data)
        return b"".join(parts)


def _post(body: bytes, close: bool = False, stream: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%b\r\n%b" % (len(body), conn, body)
    )


def test_whole_answers_and_stream_starts_written_at_once_stay_valid_http(gateway: str) -> None:
    """A non-streamed answer (one write: head and body) and a stream's start (head and first
    block in one write) parse as HTTP/1.1 on a kept-alive connection: three pipelined
    requests get three answers in order, the last closing the connection as asked."""
    whole = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 3})  # fmt: skip
    streamed = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 3, "stream": True})  # fmt: skip
    raw = _raw_exchange(gateway, [_post(whole), _post(streamed), _post(whole, close=True)])
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3, raw[:500]
    first, second, third = answers
    for answer in (first, third):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"200 OK")
        length = int(next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(
            b"content-length")).split(b":")[1])  # fmt: skip
        assert orjson.loads(body[:length])["choices"][0]["finish_reason"] == "length"
        assert b"server-timing: gateway;dur=" in head
        assert head.count(b"content-length") == 1 and b"transfer-encoding" not in head
    assert b"connection: close" in third.partition(b"\r\n\r\n")[0]
    head, _, body = second.partition(b"\r\n\r\n")
    assert head.startswith(b"200 OK") and b"transfer-encoding: chunked" in head
    events = _dechunk(body).split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and events[-1] == b""
    assert sum(e.startswith(b"data: {") for e in events) >= 3
