"""The exception tree's gateway half and the one place errors become responses.

The tree's root, `ServingError`, lives in `engines.base` so engines raise the same types;
this module adds the errors only the front door raises and renders any of them as OpenAI's
envelope `{"error": {"message", "type", "param", "code"}}` with the status the `openai` SDK
maps to its exception classes. It does not decide *when* to raise (validation, admission
and engines do).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from engines.base import (
    AdapterError,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    ServingError,
    UpstreamError,
)
from gateway.redact import scrub

__all__ = [
    "AdapterError",
    "AuthenticationError",
    "EngineOverloaded",
    "EngineTimeout",
    "EngineUnavailable",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ServingError",
    "UpstreamError",
    "error_body",
    "error_event",
    "error_headers",
]


class ModelNotFound(InvalidRequest):
    status = 404

    def __init__(self, model: str):
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


class NotFound(InvalidRequest):
    status = 404


class MethodNotAllowed(InvalidRequest):
    status = 405


class PayloadTooLarge(InvalidRequest):
    status = 413


class AuthenticationError(ServingError):
    status = 401
    type: ClassVar[str] = "invalid_request_error"

    def __init__(self, message: str = "Incorrect API key provided.") -> None:
        super().__init__(message, code="invalid_api_key")


class PermissionDenied(ServingError):
    status = 403
    type: ClassVar[str] = "permission_error"


def error_payload(exc: ServingError) -> dict[str, Any]:
    return {
        "error": {
            # The last line: no envelope carries an address, path, errno or traceback.
            "message": scrub(exc.message, exc.status),
            "type": exc.type,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_body(exc: ServingError) -> bytes:
    return orjson.dumps(error_payload(exc))


def error_event(exc: ServingError) -> bytes:
    """The SSE event that ends a stream which failed after its first byte."""
    return b"data: " + error_body(exc) + b"\n\n"


def error_headers(exc: ServingError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if isinstance(exc, (EngineOverloaded, EngineUnavailable)):
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    extra: list[tuple[bytes, bytes]] | None = getattr(exc, "headers", None)
    if extra:
        headers.extend(extra)
    return headers
