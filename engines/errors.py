"""The one exception tree every layer raises, rooted at `ServingError`.

Owns each error's HTTP status and OpenAI error `type`. Does not own rendering: the gateway
turns any of them into the OpenAI envelope in one place (`gateway.errors`).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AdapterError",
    "AdapterNotFound",
    "EngineOverloaded",
    "EngineTimeout",
    "EngineUnavailable",
    "InvalidRequest",
    "ServingError",
    "UpstreamError",
]


class ServingError(Exception):
    """Root of the one exception tree. Each subclass fixes the HTTP status and OpenAI
    error `type`; `gateway.errors` turns any of them into the OpenAI error envelope."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    # True when the message was written for the client (it names no worker, path or
    # upstream text): the gateway passes it on as is, without a leak check or a log line.
    public: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServingError):
    """The request is wrong (the engine found out, e.g. prompt longer than the context)."""

    status = 400
    type = "invalid_request_error"


class AdapterError(InvalidRequest):
    """An adapter cannot be loaded, unloaded or used as asked."""


class AdapterNotFound(AdapterError):
    """The adapter named is not loaded (vLLM answers 404 for this too)."""

    status = 404


class UpstreamError(ServingError):
    """A worker failed or answered with something that is not a valid response."""

    status = 502
    type = "upstream_error"


class EngineUnavailable(ServingError):
    """No worker can take the request now (starting, dead, draining, queue full). Every
    503 carries Retry-After: `retry_after` seconds (a worker's own value when it sent one)."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class EngineOverloaded(ServingError):
    """The engine's queue is full; the client should retry later."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class EngineTimeout(ServingError):
    status = 504
    type = "timeout"
