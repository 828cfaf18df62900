"""The stream relay's direct path against upstreams of every wire style (bench/upstreams.py):
uvicorn-style (vLLM, SGLang, LMDeploy), OpenAI-style (`"usage":null` in every chunk), Node
style (CRLF, each event split over two reads) and Go style (two events per read). For each:
the client gets the same events as from the upstream directly (LF-framed), usage is still
found, and most blocks take the direct path (`gateway_stream_blocks{path="direct"}`).
Also the two pure pieces of that path, `cut_events` and `direct_run`, on edge cases."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from bench.upstreams import STYLES, StyledUpstream
from engines.upstream.sse import SSEBuffer, cut_events, direct_run
from gateway.app import create_app
from gateway.catalog import parse_catalog
from gateway.settings import Settings
from tests.conftest import free_port
from tests.gateway.test_direct_body import Served

TOKENS = 24


class UpstreamThread:
    """One style's upstream under plain uvicorn, in a thread."""

    def __init__(self, style: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = StyledUpstream(style, style, 0.0, 1.0, TOKENS)  # serves model `style`
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve()), daemon=True
        )

    def __enter__(self) -> UpstreamThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def styled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One upstream per style and one gateway (served with nothing wrapping `send`, so the
    direct path is live) with a model per style."""
    ups = {style: UpstreamThread(style).__enter__() for style in STYLES}
    models = [{"name": style, "engine": "openai", "endpoints": [u.url]} for style, u in ups.items()]
    catalog = parse_catalog({"models": models}, base_dir=tmp_path_factory.mktemp("styles"))
    app = create_app(Settings(), catalog)
    with Served(app, Settings()) as gw:
        yield {"ups": ups, "gw": f"http://127.0.0.1:{gw.port}"}
    for u in ups.values():
        u.__exit__()


def _events(raw: bytes) -> list[bytes]:
    """The data of each SSE event, ids and timestamps masked, CRLF made LF."""
    raw = raw.replace(b"\r\n", b"\n")
    raw = re.sub(rb'"id":"[^"]*"', b'"id":"-"', raw)
    raw = re.sub(rb'"created":\d+', b'"created":0', raw)
    return [e for e in raw.split(b"\n\n") if e]


def _stream(url: str, model: str, usage: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": TOKENS,
        "stream": True,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        return r.read()


def _direct_blocks(gw: str, model: str) -> float:
    text = httpx.get(gw + "/metrics", timeout=10).text
    pattern = (
        rf'gateway_stream_blocks_total\{{[^}}]*model="{model}"[^}}]*path="direct"[^}}]*\}} (\S+)'
    )
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("style", STYLES)
def test_every_style_relays_unchanged_and_goes_direct(styled: dict[str, Any], style: str) -> None:
    up, gw = styled["ups"][style], styled["gw"]
    before = _direct_blocks(gw, style)
    for usage in (True, False):
        direct = _events(_stream(up.url, style, usage))
        proxied = _events(_stream(gw, style, usage))
        if not usage and style == "openai":
            pass  # the gateway asks the upstream for usage; its null fields reach the client
        else:
            assert proxied == direct, f"{style} usage={usage}: events differ"
        assert proxied[-1] == b"data: [DONE]"
        text = b"".join(re.findall(rb'"content":"([^"]*)"', b"\n\n".join(proxied)))
        assert text.count(b" ") == TOKENS, "every token reached the client once"
    # Of 2 streams × 24 token events, nearly all went by the direct path, whatever the style.
    went_direct = _direct_blocks(gw, style) - before
    per_block = 2 if style == "go" else 1
    assert went_direct >= (2 * TOKENS) / per_block * 0.75, f"{style}: {went_direct} direct blocks"


def test_the_sdk_reads_usage_through_an_openai_style_upstream(styled: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=styled["gw"] + "/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="openai",
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.count(" ") == TOKENS


def _chunk(i: int, usage: bytes | None = None) -> bytes:
    tail = b"" if usage is None else b',"usage":' + usage
    return b'data: {"id":"x","choices":[{"delta":{"content":"t%d"}}]%b}\n\n' % (i, tail)


def test_direct_run_takes_plain_chunks_and_null_usage_only() -> None:
    assert direct_run(_chunk(1))
    assert direct_run(_chunk(1) + _chunk(2) + _chunk(3))  # several events in one read
    assert direct_run(_chunk(1, b"null"))
    assert direct_run(_chunk(1, b"null").replace(b'"usage":null', b'"usage": null'))
    assert not direct_run(_chunk(1, b'{"prompt_tokens":1}'))  # usage must reach the loop
    assert not direct_run(_chunk(1) + _chunk(2, b'{"completion_tokens":2}'))
    assert not direct_run(_chunk(1) + b"data: [DONE]\n\n")
    assert not direct_run(b": keep-alive\n\n")
    assert not direct_run(_chunk(1) + b": ping\n\n")
    assert not direct_run(b'data: {"error":{"message":"boom"}}\n\n')
    assert not direct_run(b"event: x\ndata: {}\n\n")  # another field: not a plain chunk
    assert not direct_run(b'data: {"a":1}\ndata: {"b":2}\n\n')  # two data lines
    assert not direct_run(b"")
    # Text that only looks like a key stays text: JSON escapes its quotes.
    assert direct_run(b'data: {"choices":[{"delta":{"content":"\\"usage\\": {}"}}]}\n\n')


def test_cut_events_joins_splits_and_crlf() -> None:
    a, b = _chunk(1), _chunk(2)
    assert cut_events(b"", a) == (a, b"")
    assert cut_events(b"", a + b[:10]) == (a, b[:10])
    assert cut_events(b[:10], b[10:]) == (b, b"")
    crlf = a.replace(b"\n", b"\r\n")
    assert cut_events(b"", crlf) == (a, b"")
    # A CR ending one read waits for its LF.
    assert cut_events(b"", crlf[:-1]) == (b"", a[:-1] + b"\r")
    assert cut_events(a[:-1] + b"\r", b"\n") == (a, b"")
    buf = SSEBuffer()
    out = b"".join(buf.feed(crlf[i : i + 7]) for i in range(0, len(crlf), 7))
    assert out == a and buf.pending == b""


def test_sse_buffer_yields_the_same_events_for_every_split() -> None:
    """Every way of cutting three events into two reads yields the same events."""
    stream = _chunk(1) + _chunk(2, b"null") + _chunk(3)
    for cut in range(1, len(stream)):
        buf = SSEBuffer()
        got = buf.feed(stream[:cut]) + buf.feed(stream[cut:])
        assert got == stream and buf.pending == b""
