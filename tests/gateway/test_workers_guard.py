"""`gateway serve --workers 2` keeps the one-process gateway's connection guard in every
front door: slowloris sockets answered 408 and closed at the header deadline while normal
requests are served, a huge header answered 431, and the keep-alive timeout set in the
environment applied (each front door is a spawned process: the guard is made there)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.gateway.procs import GatewayProcess
from tests.gateway.test_server_limits import slowloris
from tests.gateway.test_tenancy import CHAT

HEADER_S = 1.5
KEEPALIVE_S = 1.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp: Path = tmp_path_factory.mktemp("workers-guard")
    models = [{"name": "m", "engine": "sim", "options": {"itl_ms": 1}}]
    proc = GatewayProcess(
        models,
        tmp,
        ("--workers", "2"),
        GATEWAY_HEADER_TIMEOUT_S=str(HEADER_S),
        GATEWAY_KEEPALIVE_TIMEOUT_S=str(KEEPALIVE_S),
    )
    try:
        yield proc.wait_ready(timeout=180)
    finally:
        proc.stop()


def test_slowloris_sockets_get_408_from_every_front_door(gw: GatewayProcess) -> None:
    async def attack() -> tuple[list[tuple[bytes, float]], list[str], float]:
        start = time.monotonic()
        lorises = [asyncio.create_task(slowloris(gw.port, HEADER_S * 10)) for _ in range(20)]
        await asyncio.sleep(0.3)
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
            normal = []
            for _ in range(4):
                r = await c.chat.completions.create(model="m", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
                normal.append(r.choices[0].finish_reason)
        return list(await asyncio.gather(*lorises)), normal, start

    results, normal, start = asyncio.run(attack())
    assert normal == ["length"] * 4
    assert len(results) == 20
    for data, _ in results:
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    # Closed by the header deadline (and the sweeper's period), well before the readers'
    # own limit of 10 deadlines.
    assert max(at for _, at in results) - start < HEADER_S * 5


def test_huge_header_is_431(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        s.settimeout(30)
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]


def test_keepalive_timeout_from_the_environment(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(30)
        first = b""
        while b"\r\n\r\n" not in first:  # the head, then the body it announces
            first += s.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += s.recv(65536)
        idle_from = time.monotonic()
        rest = b""
        while chunk := s.recv(65536):  # until the server closes the idle connection
            rest += chunk
        idle = time.monotonic() - idle_from
    assert rest == b""
    # Closed by the 1 s setting, not uvicorn's default of 5 s.
    assert idle < 4.0, idle
