"""A loopback OpenAI-compatible upstream that records every request body it receives.

The gateway attaches to it with `engine: openai`; a test then asserts on what reached
"the worker" — for hostile-input tests, that nothing did. By the served model name the
upstream also misbehaves the ways real ones do: an HTML error page, a Python traceback
as plain text, a JSON error whose message leaks an address, a context-length 400, a
stream that sends a chunk after its usage chunk ("late_chunk", each event its own write).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import orjson
from aiohttp import web

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.12/site-packages/vllm/entrypoints/openai/serving.py", '
    "line 212, in create\n"
    "ConnectionError: [Errno 111] could not reach http://10.1.2.3:9000/internal\n"
)
HTML = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    "<h1>502</h1><p>worker-7.internal.example (10.0.3.7) /srv/app/main.py</p></body></html>"
)


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


class RecordingUpstream:
    """aiohttp on 127.0.0.1 in a thread of its own; `bodies` holds (path, JSON body)."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=30)

    def start(self) -> RecordingUpstream:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def clear(self) -> None:
        self.bodies.clear()

    # ------------------------------------------------------------------ routes

    async def _health(self, _r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics(self, _r: web.Request) -> web.Response:
        return web.Response(text="", content_type="text/plain")

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = orjson.loads(await request.read())
        self.bodies.append((request.path, body))
        return dict(body)

    def _fault(self, model: str) -> web.Response | None:
        if model == "html502":
            return web.Response(status=502, text=HTML, content_type="text/html")
        if model == "trace500":
            return web.Response(status=500, text=TRACEBACK, content_type="text/plain")
        if model == "trace400":
            return web.Response(status=400, text=TRACEBACK, content_type="text/plain")
        if model == "leaky400":
            err = {"message": f"bad request at http://10.9.8.7:8000/v1: {TRACEBACK}", "code": 400}
            return web.json_response({"object": "error", **err}, status=400)
        if model == "context400":
            msg = (
                "This model's maximum context length is 2048 tokens. However, you requested "
                "4000 tokens (3000 in the messages, 1000 in the completion). Please reduce "
                "the length of the messages or completion."
            )
            return web.json_response(
                {"object": "error", "message": msg, "type": "BadRequestError", "code": 400},
                status=400,
            )
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = str(body.get("model"))
        fault = self._fault(model)
        if fault is not None:
            return fault
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": "ok"}
            else:
                choice["text"] = "ok"
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": 0,
                    "model": model,
                    "choices": [choice],
                    "usage": _usage(),
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        delta: dict[str, Any] = (
            {"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "ok", "finish_reason": "stop"}
        )
        chunks = [
            {"id": "c", "object": obj, "created": 0, "model": model, "choices": [delta]},
            {
                "id": "c",
                "object": obj,
                "created": 0,
                "model": model,
                "choices": [],
                "usage": _usage(),
            },
        ]
        if model == "late_chunk":
            chunks.insert(0, {**chunks[0], "choices": [{**delta, "finish_reason": None}]})
            chunks.append({**chunks[0], "choices": [{**delta, "finish_reason": None}]})
        for c in chunks:
            await resp.write(b"data: " + orjson.dumps(c) + b"\n\n")
            if model == "late_chunk":
                await asyncio.sleep(0.02)  # each event its own read at the gateway
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": body.get("model"),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )
