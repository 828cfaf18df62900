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

Off the request path: a request hands over one tuple (`AccessEntry`); lines are formatted
and written in batches (`AccessLog`, which says why), to stdout or through the
`gateway.access` logger when it has handlers. A request that is not sampled costs one
`random()` call.
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


# What the request path hands over at the end of a request, positionally (a plain tuple:
# building it is the whole per-request cost, ~0.3 µs; a dataclass with keywords cost 2 µs):
# (wall time, request_id, model or None, adapter, Authorization header bytes, route,
#  stream, status, prompt_tokens, completion_tokens, ttft_s, duration_s, error type,
#  tails: the last blocks where the finish reason is, worker, retries).
# `worker` and `retries` come from engines that pick among workers (None from the embedded
# engine, which has none).
AccessEntry = tuple[
    float,
    str,
    str | None,
    str | None,
    bytes | None,
    str,
    bool,
    int,
    int | None,
    int | None,
    float | None,
    float,
    str | None,
    tuple[bytes | None, ...],
    str | None,
    int | None,
]


class AccessLog:
    """Decides whether a request gets a line and takes its entry; formats and writes the
    entries later, in batches: `FLUSH_S` after the first unwritten one, when `LIMIT` are
    waiting, and at shutdown. Lines go to stdout (one `write` per batch), or through the
    `gateway.access` logger when the host configured handlers on it (log shipping set up
    with `logging`; the tests read lines that way).

    Measured reason (bench/access_log_cost.py): formatting a line (key hash, finish reason,
    time stamp, orjson) cost ~11 µs and a line through `logging` ~85 µs; on the request
    path now is one tuple and one list append (< 1 µs), and the formatting reuses what the
    batch shares (the time stamp of the second, the key id of a token seen before)."""

    FLUSH_S = 0.1
    LIMIT = 512
    # Key ids remembered per Authorization header (bounded: cleared when full).
    KEY_IDS = 4096

    __slots__ = ("_keys", "_log", "_pending", "_sec", "_stamp", "_timer", "_to_stdout",
                 "enabled", "sample")  # fmt: skip

    def __init__(self, enabled: bool, sample: float):
        self.enabled = enabled
        self.sample = sample
        log = logging.getLogger(LOGGER)
        self._log = log if log.handlers else None
        if self._log is not None and log.level == logging.NOTSET:
            log.setLevel(logging.INFO)  # the lines are INFO records: not lost to the root's level
        self._to_stdout = self._log is None and enabled
        self._pending: list[AccessEntry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._keys: dict[bytes, str | None] = {}
        self._sec = -1
        self._stamp = ""
        if self._to_stdout:
            atexit.register(self.flush)

    def wanted(self, failed: bool) -> bool:
        """Failed requests are always logged; the others at the sample rate."""
        if not self.enabled:
            return False
        return failed or self.sample >= 1.0 or random.random() < self.sample

    def emit(self, e: AccessEntry) -> None:
        """Take one entry; it is formatted and written with its batch."""
        pending = self._pending
        pending.append(e)
        if len(pending) >= self.LIMIT:
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
        if not self._pending:
            return
        entries, self._pending = self._pending, []
        lines = [self.format(e) for e in entries]
        if self._log is not None:
            for line in lines:
                self._log.info("%s", line.decode())
            return
        if not self._to_stdout:
            return
        lines.append(b"")
        data = memoryview(b"\n".join(lines))
        with contextlib.suppress(OSError):  # stdout closed: the lines are lost, not the app
            while data:
                data = data[os.write(1, data) :]

    def _time(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:  # strftime once a second, not once a line
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return "%s.%03dZ" % (self._stamp, (now - sec) * 1000)  # noqa: UP031  (faster than f"")

    def _key_id(self, authorization: bytes | None) -> str | None:
        if not authorization:
            return None
        keys = self._keys
        kid = keys.get(authorization, "")
        if kid == "":
            if len(keys) >= self.KEY_IDS:
                keys.clear()
            kid = keys[authorization] = key_id(authorization)
        return kid

    def format(self, e: AccessEntry) -> bytes:
        (at, rid, model, adapter, auth, route, stream, status, prompt, completion, ttft,
         duration, error, tails, worker, retries) = e  # fmt: skip
        line: dict[str, Any] = {
            "time": self._time(at),
            "request_id": rid,
            "model": model,
            "adapter": adapter,
            "key_id": self._key_id(auth),
            "route": route,
            "stream": stream,
            "status": status,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
            "duration_ms": round(duration * 1000, 3),
            "worker": worker,
            "retries": retries,
            "finish_reason": finish_reason(*tails) if status == 200 else None,
        }
        if error is not None:
            line["error"] = error
        return orjson.dumps(line)
