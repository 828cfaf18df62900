"""The access log: one JSON line per API request on the `gateway.access` logger.

Owns the line's fields and format, sampling, the key id (a SHA-256 prefix of the bearer
token, never the token) and finding the finish reason in the response's last bytes. It
does not decide when a request ends (`RequestRecord.finished` calls `emit` once) nor
count anything (`gateway.metrics`).

Fields: `time` (UTC, ISO 8601), `request_id`, `model`, `adapter`, `key_id`, `route`,
`stream`, `status` (499: the client left), `prompt_tokens`, `completion_tokens`,
`ttft_ms` (streams), `duration_ms`, `worker`, `retries`, `finish_reason`, and `error`
(the OpenAI error type) when it failed. `worker` and `retries` are null: the engines do
not report per request which worker answered or how often they retried.

Cost: a request that is not sampled costs one `random()` call; the finish reason, key
hash and JSON encoding are only computed for a line that is written.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
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


def _stdout_logger() -> logging.Logger:
    """The access logger, writing bare lines to stdout unless the host app configured it."""
    log = logging.getLogger(LOGGER)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    return log


class AccessLog:
    """Decides whether a request gets a line, and writes it."""

    __slots__ = ("_log", "enabled", "sample")

    def __init__(self, enabled: bool, sample: float):
        self.enabled = enabled
        self.sample = sample
        self._log = _stdout_logger()

    def wanted(self, failed: bool) -> bool:
        """Failed requests are always logged; the others at the sample rate."""
        if not self.enabled:
            return False
        return failed or self.sample >= 1.0 or random.random() < self.sample

    def emit(self, e: AccessEntry) -> None:
        self._log.info("%s", self.format(e))

    @staticmethod
    def format(e: AccessEntry) -> str:
        now = time.time()
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
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
            "worker": None,
            "retries": None,
            "finish_reason": finish_reason(*e.tails) if e.status == 200 else None,
        }
        if e.error_type is not None:
            line["error"] = e.error_type
        return orjson.dumps(line).decode()
