"""One request of a load run: send it, read the answer (whole or SSE), stamp every byte.

Owns the hand-written request/SSE client: an incremental SSE splitter over raw bytes and
orjson per event, with every timestamp taken right where bytes arrive (TTFT, each
inter-chunk gap, end). Why hand-written and not the `openai` SDK or httpx: the tool measures
a gateway that adds well under a millisecond, so the client's own cost per request and per
chunk must be small and the same for every target. Does not own the load loop
(`loadgen.runner`) or the statistics (`loadgen.metrics`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from loadgen.metrics import RequestRecord

__all__ = ["send"]


def _has_output(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries output (chat delta or completions text)."""
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    if not delta:
        return False
    return bool(
        delta.get("content")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
        or delta.get("tool_calls")
    )


def _error_detail(body: bytes) -> str:
    """The message of an OpenAI error envelope, else the body's start."""
    try:
        obj = orjson.loads(body)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            return f"{err.get('type')}: {err.get('message')}"[:300]
        if isinstance(err, str):
            return err[:300]
    except orjson.JSONDecodeError:
        pass
    return body[:300].decode("utf-8", "replace")


class _StreamState:
    """Per-request SSE parse state; events can span reads, so bytes are buffered."""

    __slots__ = ("buf", "done", "last", "rec")

    def __init__(self, rec: RequestRecord) -> None:
        self.rec = rec
        self.buf = b""
        self.done = False
        self.last: float | None = None  # perf_counter of the last output chunk

    def feed(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        if b"\r" in buf:  # SSE allows CRLF; normalise once per read, not per event
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            if end > start:
                self.event(buf[start:end], now)
            start = end + 2
        self.buf = buf[start:]

    def finish(self, now: float) -> None:
        rest = self.buf.strip()
        self.buf = b""
        if rest:  # a last event not followed by a blank line still counts
            self.event(rest, now)

    def event(self, raw: bytes, now: float) -> None:
        if raw.startswith(b"data:") and b"\n" not in raw:
            payload = raw[5:]
        else:  # multi-line event: join its data lines, skip comments / event / id
            lines = [ln[5:] for ln in raw.split(b"\n") if ln.startswith(b"data:")]
            if not lines:
                return
            payload = b"\n".join(ln[1:] if ln[:1] == b" " else ln for ln in lines)
            self._payload(payload, now)
            return
        if payload[:1] == b" ":
            payload = payload[1:]
        self._payload(payload, now)

    def _payload(self, payload: bytes, now: float) -> None:
        rec = self.rec
        if payload == b"[DONE]":
            self.done = True
            return
        if rec.chunks is not None:
            rec.chunks.append(payload)
        obj = orjson.loads(payload)
        choices = obj.get("choices")
        if choices and _has_output(choices[0]):
            if self.last is None:
                rec.ttft = now - rec.start
            else:
                rec.itl.append(now - self.last)
            self.last = now
            rec.output_chunks += 1
        usage = obj.get("usage")
        if usage:
            rec.usage_seen = True
            rec.output_tokens = int(usage.get("completion_tokens") or 0)
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        err = obj.get("error")
        if err and not choices:
            rec.error = "stream_error"
            rec.error_detail = _error_detail(payload)


async def send(
    session: aiohttp.ClientSession,
    stream: bool,
    url: str,
    body: bytes,
    headers: dict[str, str],
    rec: RequestRecord,
    req_timeout: aiohttp.ClientTimeout,
) -> None:
    """Send one request and fill `rec`. Never raises except on cancellation."""
    perf = time.perf_counter
    rec.start = perf()
    try:
        async with session.post(url, data=body, headers=headers, timeout=req_timeout) as resp:
            rec.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                rec.bytes_received = len(raw)
                rec.error = f"http_{resp.status}"
                rec.error_detail = _error_detail(raw)
                return
            if stream:
                st = _StreamState(rec)
                received = 0
                async for data in resp.content.iter_any():
                    now = perf()
                    received += len(data)
                    st.feed(data, now)
                st.finish(perf())
                rec.bytes_received = received
                if st.last is not None:
                    rec.latency = st.last - rec.start
                if not rec.usage_seen:
                    rec.output_tokens = rec.output_chunks
                if rec.error is None:
                    if rec.output_chunks == 0:
                        rec.error = "no_output"
                    elif not st.done:
                        rec.error = "no_done"  # stream ended without `data: [DONE]`
                    else:
                        rec.ok = True
            else:
                raw = await resp.read()
                now = perf()
                rec.bytes_received = len(raw)
                rec.ttft = rec.latency = now - rec.start
                obj = orjson.loads(raw)
                choices = obj.get("choices") or []
                text = ""
                if choices:
                    msg = choices[0].get("message")
                    text = (msg.get("content") if msg else choices[0].get("text")) or ""
                rec.output_chunks = 1 if text else 0
                usage = obj.get("usage")
                if usage:
                    rec.usage_seen = True
                    rec.output_tokens = int(usage.get("completion_tokens") or 0)
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                else:  # no usage: whitespace words are the best estimate without a tokenizer
                    rec.output_tokens = len(text.split())
                if choices:
                    rec.ok = True
                else:
                    rec.error = "no_choices"
                    rec.error_detail = _error_detail(raw)
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        rec.error = "timeout"
    except aiohttp.ClientError as exc:
        rec.error = type(exc).__name__
        rec.error_detail = str(exc)[:300]
    except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        rec.error = "bad_response"
        rec.error_detail = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        rec.done = perf() - rec.start
