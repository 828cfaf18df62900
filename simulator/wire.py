"""HTTP/1.1 framing and vLLM's error shapes, as the simulator writes them.

Owns status lines, the constant stream framing and the `HttpError` the handlers raise. Does
not own parsing (httptools, in `simulator.connection`) or what a request answers.
"""

from __future__ import annotations

from typing import Any

# --------------------------------------------------------------------------- wire helpers

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
# vLLM's error `type` for a status (its HTTPStatus → exception-name mapping).
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "TimeoutError",
    413: "BadRequestError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nserver: gateway-sim\r\n\r\n"
)
DONE_CHUNK = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


def head(status: int, ctype: bytes, length: int, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nserver: gateway-sim\r\n%s\r\n"
        % (status, REASONS.get(status, b"Error"), ctype, length, extra)
    )


class HttpError(Exception):
    """A request the simulator answers with an error envelope (vLLM's shape)."""

    def __init__(self, status: int, message: str, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or ERROR_TYPES.get(status, "InternalServerError")


def count_words(value: Any) -> int:
    """Deterministic 'prompt tokens': words of every string, length of token-id lists."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(count_words(value.get(k)) for k in ("content", "text"))
    return 0
