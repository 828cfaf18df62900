"""The access log: one JSON line per API request on the `gateway.access` logger.

Owns the line's fields and format, sampling, the key id (a SHA-256 prefix of the bearer
token, never the token) and finding the finish reason in the response's last bytes. It
does not decide when a request ends (`RequestRecord.finished` calls `emit` once) nor
count anything (`gateway.metrics`).

Fields: `time` (UTC, ISO 8601), `request_id`, `model`, `adapter`, `key_id`, `route`,
`stream`, `status` (499: the client left), `prompt_tokens`, `completion_tokens`,
`ttft_ms` (streams), `duration_ms`, `worker`, `retries`, `finish_reason`, and `error`
(the OpenAI error type) when it failed. `worker` and `retries` come from engines
that pick among workers (null for the embedded engine, which has none).

Lines go to stdout in batches (`_StdoutLines`, which says why), or through the
`gateway.access` logger when it has handlers. Cost: a request that is not sampled costs
one `random()` call; the finish reason, key hash and JSON encoding are only computed for
a line that is written.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson

LOGGER = "gateway.access"

_FINISH = b'"finish_reason":'


def key_id(authorization: bytes | None) -> str | None:
    """12 hex digits of the SHA-256 of the bearer token: which key, never the key."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return hashlib.sha256(token.strip()).hexdigest()[:12]


def finish_reason(*tails: bytes | None) -> str | None:
    """The last `finish_reason` that is a string in the given bytes (searched in order)."""
    for tail in tails:
        if not tail:
            continue
        end = len(tail)
        while True:
            pos = tail.rfind(_FINISH, 0, end)
            if pos < 0:
                break
            value = tail[pos + len(_FINISH) : pos + len(_FINISH) + 40].lstrip()
            if value.startswith(b'"'):
                close = value.find(b'"', 1)
                if close > 0:
                    return value[1:close].decode("utf-8", "replace")
            end = pos  # null (a chunk before the last): look further back
    return None


@dataclass(slots=True)
class AccessEntry:
    """What the request path knows at the end of a request."""

    request_id: str
    model: str | None
    adapter: str | None
    authorization: bytes | None
    route: str
    stream: bool
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_s: float | None
    duration_s: float
    error_type: str | None
    tails: tuple[bytes | None, ...]
    # Which worker answered and how many attempts failed before it, from engines that pick
    # among workers (None from the embedded engine, which has none).
    worker: str | None = None
    retries: int | None = None


class _StdoutLines:
    """Lines batched onto file descriptor 1: written when 64 KiB have gathered or
    `FLUSH_S` after the first unwritten line, and at shutdown.

    Measured reason: a line through `logging` (record, handler lock, a write and a flush
    per line) cost ~85 µs of gateway CPU per request, more than the rest of a
    non-streamed request's handling; batched, the cost is the formatting."""

    FLUSH_S = 0.1
    LIMIT = 64 * 1024

    __slots__ = ("_buf", "_size", "_timer")

    def __init__(self) -> None:
        self._buf: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        atexit.register(self.flush)

    def write(self, line: bytes) -> None:
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.LIMIT:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        data = memoryview(b"".join(self._buf))
        self._buf.clear()
        self._size = 0
        with contextlib.suppress(OSError):  # stdout closed: the lines are lost, not the app
            while data:
                data = data[os.write(1, data) :]


class AccessLog:
    """Decides whether a request gets a line, formats it and writes it: to stdout in
    batches, or through the `gateway.access` logger when the host configured handlers
    on it (log shipping set up with `logging`; the tests read lines that way)."""

    __slots__ = ("_log", "_out", "_sec", "_stamp", "enabled", "sample")

    def __init__(self, enabled: bool, sample: float):
        self.enabled = enabled
        self.sample = sample
        log = logging.getLogger(LOGGER)
        self._log = log if log.handlers else None
        if self._log is not None and log.level == logging.NOTSET:
            log.setLevel(logging.INFO)  # the lines are INFO records: not lost to the root's level
        self._out = _StdoutLines() if self._log is None and enabled else None
        self._sec = -1
        self._stamp = ""

    def wanted(self, failed: bool) -> bool:
        """Failed requests are always logged; the others at the sample rate."""
        if not self.enabled:
            return False
        return failed or self.sample >= 1.0 or random.random() < self.sample

    def emit(self, e: AccessEntry) -> None:
        line = self.format(e)
        if self._out is not None:
            self._out.write(line + b"\n")
        elif self._log is not None:
            self._log.info("%s", line.decode())

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def _time(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._sec:  # strftime once a second, not once a line
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._stamp}.{int((now - sec) * 1000):03d}Z"

    def format(self, e: AccessEntry) -> bytes:
        line: dict[str, Any] = {
            "time": self._time(),
            "request_id": e.request_id,
            "model": e.model,
            "adapter": e.adapter,
            "key_id": key_id(e.authorization),
            "route": e.route,
            "stream": e.stream,
            "status": e.status,
            "prompt_tokens": e.prompt_tokens,
            "completion_tokens": e.completion_tokens,
            "ttft_ms": None if e.ttft_s is None else round(e.ttft_s * 1000, 3),
            "duration_ms": round(e.duration_s * 1000, 3),
            "worker": e.worker,
            "retries": e.retries,
            "finish_reason": finish_reason(*e.tails) if e.status == 200 else None,
        }
        if e.error_type is not None:
            line["error"] = e.error_type
        return orjson.dumps(line)
