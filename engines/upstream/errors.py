"""Upstream error answers → the engine contract's `ServingError`s.

Owns the error types only an upstream hop raises (model not found upstream, adapter not
loaded, payload too large) and `normalise_error`, which reads every error shape the
OpenAI-compatible servers behind us send (OpenAI's envelope, vLLM's / LMDeploy's flat
`{"object": "error"}`, FastAPI's `{"detail": ...}`, plain text). Does not own how an error
reaches the client (the gateway renders every ServingError in one place).
"""

from __future__ import annotations

from typing import Any

import orjson

from engines.base import (
    AdapterNotFound,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    ServingError,
    UpstreamError,
)

__all__ = [
    "AdapterNotFound",
    "PayloadTooLarge",
    "UpstreamModelNotFound",
    "error_status_of_event",
    "is_backpressure",
    "is_json_error",
    "normalise_error",
    "parse_error_body",
]


class UpstreamModelNotFound(InvalidRequest):
    """The upstream does not serve the model (or adapter) named: 404 model_not_found."""

    status = 404

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = None):
        super().__init__(message, param=param, code=code or "model_not_found")


class PayloadTooLarge(InvalidRequest):
    status = 413


def normalise_error(status: int, body: bytes) -> ServingError:
    """The ServingError for an upstream error answer. Understands OpenAI's envelope,
    vLLM's/LMDeploy's flat `{"object": "error", "message": ...}`, FastAPI's
    `{"detail": ...}` (a string or a validation list), `{"message": ...}`,
    `{"error": "text"}`, and plain text."""
    message, etype, param, code = parse_error_body(body)
    if not message:
        message = f"upstream answered HTTP {status} without a JSON error"
    text = message.lower()
    if code is None and "maximum context length" in text:  # vLLM's / SGLang's text
        code = "context_length_exceeded"
    if status == 404 and ("model" in text or code == "model_not_found" or "lora" in text):
        return UpstreamModelNotFound(message, param=param or "model")
    if status in (400, 422):
        return InvalidRequest(message, param=param, code=code)
    if status == 413:
        return PayloadTooLarge(message, param=param, code=code)
    if status == 429:
        return EngineOverloaded(message, code=code)
    if status in (408, 504):
        return EngineTimeout(message)
    if status == 503:
        return EngineUnavailable(message)
    if status in (401, 403):
        # The client passed the gateway's auth; the upstream refusing the gateway's
        # own credentials is a configuration fault of this hop.
        return UpstreamError(f"upstream refused the gateway's credentials: {message}")
    if 400 <= status < 500:
        return InvalidRequest(message, param=param, code=code)
    err = UpstreamError(message)
    if etype:
        err.code = code
    return err


# Words of a 503 that means "busy, come back later" rather than "broken".
_BACKPRESSURE = ("queue", "overload", "capacity", "too many", "busy", "rate limit")


def is_backpressure(status: int, err: ServingError) -> bool:
    """A 429, or a 503 that says the worker is full (its queue, capacity): the worker is
    working, so it never counts toward ejection and is not retried elsewhere."""
    if status == 429:
        return True
    if status != 503:
        return False
    text = err.message.lower()
    return any(w in text for w in _BACKPRESSURE)


def error_status_of_event(obj: dict[str, Any]) -> int:
    """An error sent with status 200 (in a stream, or a body): its own code decides."""
    err = obj.get("error")
    code = err.get("code") if isinstance(err, dict) else obj.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return status


def is_json_error(body: bytes) -> bool:
    """Whether an error answer is a JSON object (any of the shapes `parse_error_body`
    reads), as opposed to an HTML page or plain text."""
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False


def parse_error_body(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, param, code) from any of the error shapes upstreams send."""
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        # An HTML page, a traceback, a proxy's text: never relayed (the engine logs it
        # with the request id); the caller words a generic message of the status.
        return "", None, None, None
    if isinstance(obj, str):
        return obj, None, None, None
    if not isinstance(obj, dict):
        return str(obj)[:2000], None, None, None
    src: Any = obj
    if "error" in obj:
        src = obj["error"]
        if not isinstance(src, dict):
            return str(src), None, None, None
    elif "detail" in obj and "message" not in obj:
        detail = obj["detail"]
        if isinstance(detail, list):  # FastAPI / pydantic validation errors
            msgs, param = [], None
            for d in detail:
                if isinstance(d, dict):
                    loc = [str(x) for x in d.get("loc", []) if x != "body"]
                    param = param or (".".join(loc) or None)
                    msgs.append(
                        f"{'.'.join(loc)}: {d.get('msg', '')}" if loc else str(d.get("msg"))
                    )
                else:
                    msgs.append(str(d))
            return "; ".join(msgs), None, param, None
        return str(detail), None, None, None
    message = src.get("message") or src.get("msg") or src.get("detail") or ""
    etype, param, code = src.get("type"), src.get("param"), src.get("code")
    return (
        str(message),
        etype if isinstance(etype, str) else None,
        param if isinstance(param, str) else None,
        code if isinstance(code, str) else None,
    )
