"""OpenAI-compatible upstreams of several wire styles, for benchmarks and tests that must not
rest on our own simulator alone.

    python bench/upstreams.py --style openai --port 9001 --ttft-ms 20 --itl-ms 5 --tokens 32

One raw ASGI app served by uvicorn (httptools, uvloop), as vLLM, SGLang and LMDeploy serve
theirs. What differs between styles is only what goes over the wire for a stream:

- `uvicorn`: no `usage` key in chunks (vLLM, SGLang, LMDeploy); one event per HTTP chunk;
- `openai`: `"usage":null` in every chunk once usage is asked (OpenAI's own API); framed
  as uvicorn;
- `node`: CRLF line ends, each event in two HTTP chunks (its line, then the blank line), as
  Node servers that write line by line do;
- `go`: two events per HTTP chunk (a buffered writer flushed every second event).

Every style ends with the usage chunk (when `stream_options.include_usage`) and
`data: [DONE]`. Answers are deterministic for a given request (ids count up), so a relay can
be checked chunk by chunk against the upstream. Owns nothing the gateway imports; it is a
benchmark instrument. Traffic: it only listens on the address it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

STYLES = ("uvicorn", "openai", "node", "go")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class StyledUpstream:
    """The ASGI app: `/v1/models`, `/health`, `/v1/chat/completions`, `/v1/completions`."""

    def __init__(self, style: str, model: str, ttft_ms: float, itl_ms: float, tokens: int):
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}")
        self.style = style
        self.model = model
        self.ttft_s = ttft_ms / 1000
        self.itl_s = itl_ms / 1000
        self.tokens = tokens
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["method"] == "GET":
            if path == "/v1/models":
                body = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
                return await _answer(send, 200, orjson.dumps(body))
            if path in ("/health", "/health/ready"):
                return await _answer(send, 200, b"{}")
            return await _answer(send, 404, b'{"error":{"message":"not found"}}')
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return await _answer(send, 404, b'{"error":{"message":"not found"}}')
        await self.generate(orjson.loads(raw), path.endswith("chat/completions"), send)

    async def generate(self, req: dict[str, Any], chat: bool, send: Send) -> None:
        n_out = int(req.get("max_tokens") or self.tokens)
        prompt = orjson.dumps(req.get("messages") if chat else req.get("prompt"))
        usage = {
            "prompt_tokens": max(1, prompt.count(b" ") + 1),
            "completion_tokens": n_out,
            "total_tokens": max(1, prompt.count(b" ") + 1) + n_out,
        }
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        words = [WORDS[i % len(WORDS)] + " " for i in range(n_out)]
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        if not req.get("stream"):
            text = "".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            body = {"id": rid, "object": obj, "created": created, "model": self.model,
                    "choices": [choice], "usage": usage}  # fmt: skip
            return await _answer(send, 200, orjson.dumps(body))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        opts = req.get("stream_options") or {}
        want_usage = bool(opts.get("include_usage"))
        null_usage = self.style == "openai" and want_usage
        head = {"id": rid, "object": f"{obj}.chunk", "created": created, "model": self.model}
        events: list[bytes] = []
        for i, word in enumerate(words):
            fin = "length" if i == n_out - 1 else None
            if chat:
                delta: dict[str, Any] = {"content": word}
                if i == 0:
                    delta = {"role": "assistant", "content": word}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}
            else:
                choice = {"index": 0, "text": word, "logprobs": None, "finish_reason": fin}
            chunk: dict[str, Any] = {**head, "choices": [choice]}
            if null_usage:
                chunk["usage"] = None
            if i and self.itl_s:
                await asyncio.sleep(self.itl_s)
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
            events = await self._emit(send, events, last=False)
        if want_usage:
            events.append(
                b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
            )
        events.append(b"data: [DONE]\n\n")
        await self._emit(send, events, last=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _emit(self, send: Send, events: list[bytes], last: bool) -> list[bytes]:
        """Write what this style writes now; return the events it keeps for later."""
        if self.style == "go":
            if len(events) < 2 and not last:
                return events
            await _chunk(send, b"".join(events))
            return []
        for event in events:
            if self.style == "node":
                line = event[:-2].replace(b"\n", b"\r\n")
                await _chunk(send, line + b"\r\n")
                await _chunk(send, b"\r\n")
            else:
                await _chunk(send, event)
        return []


async def _chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


def command(style: str, port: int, ttft_ms: float, itl_ms: float, tokens: int,
            python: str, model: str = "sim-model") -> list[str]:  # fmt: skip
    """The command line that serves one style on 127.0.0.1:`port`."""
    return [python, "-m", "bench.upstreams", "--style", style, "--port", str(port),
            "--model", model, "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
            "--tokens", str(tokens)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", choices=STYLES, default="uvicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--model", default="sim-model")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=16, help="output tokens without max_tokens")
    a = p.parse_args(argv)
    app = StyledUpstream(a.style, a.model, a.ttft_ms, a.itl_ms, a.tokens)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop", timeout_keep_alive=75)  # fmt: skip


if __name__ == "__main__":
    main()
