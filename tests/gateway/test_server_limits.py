"""Slow and greedy clients over raw sockets: slowloris, a trickling body, a huge header,
too many connections, idle keep-alive — each cut as configured while the gateway keeps
answering normal requests (through the real `openai` SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import ServerThread, start_gateway
from tests.recording_upstream import RecordingUpstream

HEADER_S = 2.0
GAP_S = 1.0
BODY_S = 3.0
KEEPALIVE_S = 1.0
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    server = start_gateway(
        [{"name": "m", "engine": "openai", "endpoints": [upstream.url]}],
        tmp_path_factory.mktemp("limits"),
        header_timeout_s=HEADER_S,
        body_gap_timeout_s=GAP_S,
        body_timeout_s=BODY_S,
        keepalive_timeout_s=KEEPALIVE_S,
    )
    yield server
    server.stop()


def _guard(server: ServerThread) -> object:
    return server.server.config.http_protocol_class.guard


async def _read_all(reader: asyncio.StreamReader, limit_s: float) -> tuple[bytes, float]:
    """Everything until EOF (or a reset), and when EOF came."""
    data = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data, time.monotonic()


async def slowloris(
    port: int,
    limit_s: float,
    start: bytes = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
    drip: bytes = b"X",
) -> tuple[bytes, float]:
    """One slowloris socket: `start`, then `drip` every 0.3 s (by default a request head
    one byte at a time) for as long as the server keeps the connection open; what it
    answered, and when it closed (`_read_all`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(start)
    reading = asyncio.create_task(_read_all(reader, limit_s))
    while not reading.done():
        try:
            writer.write(drip)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            break
        await asyncio.sleep(0.3)
    writer.close()
    return await reading


async def _sdk_chat(url: str) -> str:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
        out = await c.chat.completions.create(model="m", messages=CHAT)  # type: ignore[arg-type]
        return str(out.choices[0].message.content)


def test_slowloris_sockets_closed_while_normal_requests_succeed(gw: ServerThread) -> None:
    port = gw.port
    guard = _guard(gw)
    timed_out_before = guard.timed_out  # type: ignore[attr-defined]

    async def loris(results: list[tuple[bytes, float]]) -> None:
        results.append(await slowloris(port, HEADER_S * 5))

    async def attack() -> tuple[list[tuple[bytes, float]], list[str], float]:
        results: list[tuple[bytes, float]] = []
        start = time.monotonic()
        lorises = [asyncio.create_task(loris(results)) for _ in range(100)]
        await asyncio.sleep(0.5)  # all 100 are holding connections now
        normal = [await _sdk_chat(gw.url) for _ in range(3)]
        await asyncio.gather(*lorises)
        return results, normal, start

    results, normal, start = asyncio.run(attack())
    assert normal == ["ok", "ok", "ok"]
    assert len(results) == 100
    for data, _ in results:
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert b"took too long" in data
    # Every one was closed by the header deadline (plus the sweeper's period), long
    # before the 5x safety limit of the reader.
    latest = max(at for _, at in results) - start
    assert latest < HEADER_S * 3
    assert guard.timed_out - timed_out_before >= 100  # type: ignore[attr-defined]


def test_silent_connection_closed_at_header_timeout(gw: ServerThread) -> None:
    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        data, _ = await _read_all(reader, HEADER_S * 5)
        writer.close()
        return data

    assert asyncio.run(run()) == b""  # nothing asked, nothing answered: just closed


def _post_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("chunked", [False, True])
def test_trickling_body_cut_at_total_timeout(
    gw: ServerThread, upstream: RecordingUpstream, chunked: bool
) -> None:
    upstream.clear()

    async def run() -> tuple[bytes, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        start = b'{"model": "m", "messages": ['
        if chunked:
            start = b"%x\r\n%s\r\n" % (len(start), start)
        writer.write(_post_head(None if chunked else 100_000) + start)
        reader_task = asyncio.create_task(_read_all(reader, BODY_S * 5))
        sent = 0
        while not reader_task.done():  # one byte every 0.3 s: within the gap, never done
            try:
                writer.write(b"1\r\n \r\n" if chunked else b" ")
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                break
            sent += 1
            await asyncio.sleep(0.3)
        data, _ = await reader_task
        writer.close()
        return data, sent

    data, sent = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"body took too long" in data
    # Cut by the total (BODY_S), not the gap: more bytes went out than one gap allows.
    assert sent > GAP_S / 0.3
    assert upstream.bodies == []


def test_stalled_body_cut_at_gap_timeout(gw: ServerThread, upstream: RecordingUpstream) -> None:
    upstream.clear()

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_post_head(1000) + b'{"model": "m"')
        data, _ = await _read_all(reader, BODY_S * 5)
        writer.close()
        return data

    data = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 408 ")
    assert upstream.bodies == []


def _raw(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return data


def test_huge_header_is_431(gw: ServerThread) -> None:
    one = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    data = _raw(gw.port, one)
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    many += b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(100)) + b"\r\n"
    assert _raw(gw.port, many).startswith(b"HTTP/1.1 431 ")
    long_url = b"GET /health?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _raw(gw.port, long_url).startswith(b"HTTP/1.1 431 ")
    # A header under the limit is served.
    ok = _raw(
        gw.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Ok: "
        + b"a" * 8000
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert asyncio.run(_sdk_chat(gw.url)) == "ok"


def test_keepalive_idle_connection_closed(gw: ServerThread) -> None:
    async def run() -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(req)
        first = await reader.readuntil(b'"models"')
        await asyncio.sleep(KEEPALIVE_S / 4)  # still open: a second request is served
        writer.write(req)
        data, _ = await _read_all(reader, KEEPALIVE_S * 10)
        writer.close()
        return first, data

    first, rest = asyncio.run(run())
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest.count(b"HTTP/1.1 200 ") == 1  # the second answer, then EOF once idle


def test_connection_caps(upstream: RecordingUpstream, tmp_path: Path) -> None:
    server = start_gateway(
        [{"name": "m", "engine": "openai", "endpoints": [upstream.url]}],
        tmp_path,
        max_connections_per_client=5,
        max_connections=8,
    )
    held: list[socket.socket] = []
    try:

        def hold(source: str) -> None:
            s = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
            held.append(s)

        for _ in range(5):
            hold("127.0.0.1")
        deadline = time.monotonic() + 10
        guard = _guard(server)
        while len(guard.live) < 5 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        refused = _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 429 "), refused[:80]
        for _ in range(3):  # other addresses still get in, up to the total
            hold("127.0.0.2")
        while len(guard.live) < 8 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        full = _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.3")
        assert full.startswith(b"HTTP/1.1 503 "), full[:80]
        for s in held:
            s.close()
        held.clear()
        while guard.live and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert asyncio.run(_sdk_chat(server.url)) == "ok"  # released: served again
    finally:
        for s in held:
            s.close()
        server.stop()


def test_early_answer_then_trickle_gets_no_second_answer(gw: ServerThread) -> None:
    """The gateway answers 413 from Content-Length before reading the body; a client that
    keeps trickling the body is cut at the body deadline without a second response."""

    # The body trickled one space every 0.3 s after the head.
    start = _post_head(10_000_000) + b"{"
    data, _ = asyncio.run(slowloris(gw.port, BODY_S * 5, start=start, drip=b" "))
    assert data.startswith(b"HTTP/1.1 413 ")
    assert data.count(b"HTTP/1.1 ") == 1


def test_slow_second_request_on_a_kept_alive_connection(gw: ServerThread) -> None:
    """The header deadline restarts for every request of a connection."""

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b'"models"')
        await asyncio.sleep(KEEPALIVE_S / 4)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        reader_task = asyncio.create_task(_read_all(reader, HEADER_S * 5))
        while not reader_task.done():
            try:
                writer.write(b"X")
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                break
            await asyncio.sleep(0.2)
        data, _ = await reader_task
        writer.close()
        return data

    rest = asyncio.run(run())
    assert b"HTTP/1.1 408 " in rest, rest[:300]
