"""What an error message may tell a client: nothing of the gateway's or a worker's insides.

Owns the leak test (a URL, an IP address, an errno, a traceback, a source or file-system
path, an HTML page) and the replacements: `public_error` turns an engine's error into
one that names the model (5xx always; 4xx when its text leaks), logging the original
with the request id; `scrub` is the last line in `gateway.errors.error_payload`, so no
envelope the gateway writes, raised anywhere, carries such text. It does not decide
statuses or types (the exception tree does).
"""

from __future__ import annotations

import copy
import logging
import re

from engines.errors import ServingError

log = logging.getLogger("gateway.errors")

MAX_MESSAGE = 1000

_LEAK = re.compile(
    r"""
    [a-z][a-z0-9+.\-]*://                        # any URL with a scheme
    | \b\d{1,3}(?:\.\d{1,3}){3}\b                # IPv4
    | (?<![\w:])[0-9a-f]{0,4}::[0-9a-f]{1,4}\b     # IPv6 with ::
    | (?<![\w:])(?:[0-9a-f]{1,4}:){3,7}[0-9a-f]{1,4}(?![\w:])  # IPv6 in full
    | \[?errno\b | \berrno\s*\d                  # OS errors
    | traceback\s*\(most\s+recent | \btraceback\b
    | \bfile\s+"[^"]+",\s*line\s+\d+             # Python frames
    | \.py\b | \.pyc\b | site-packages
    | (?:^|[\s'"(=:,\[])/(?:home|root|usr|etc|var|tmp|opt|proc|sys|srv|mnt|dev|lib|lib64|
        run|app|work|data|models|workspace|snap|nix|private|users|volumes)(?:/|\b)
    | \b[a-z]:\\                                 # Windows drive paths
    | <\s*(?:!doctype|html|head|body|title|pre)\b # an HTML page
    """,
    re.IGNORECASE | re.VERBOSE,
)

_BY_STATUS = {
    400: "The request was refused as invalid.",
    401: "Authentication failed.",
    403: "The request is not allowed.",
    404: "Not found.",
    405: "Method not allowed.",
    408: "The request took too long to arrive.",
    413: "The request is too large.",
    422: "The request was refused as invalid.",
    429: "Too many requests; try again shortly.",
    500: "The server had an error while processing the request.",
    502: "An upstream worker failed while answering.",
    503: "The service is temporarily unavailable; try again shortly.",
    504: "An upstream worker did not answer in time.",
}


def leaks(message: str) -> bool:
    """Whether the text shows an address, a path, an errno, a traceback or HTML."""
    return _LEAK.search(message) is not None


def generic(status: int, model: str | None = None) -> str:
    if model is not None:
        m = f"`{model}`"
        by_model = {
            500: f"The model {m} had an error while processing the request.",
            502: f"The model {m} failed while answering; try again.",
            503: f"The model {m} is temporarily unavailable; try again shortly.",
            504: f"The model {m} did not answer in time.",
        }
        if status in by_model:
            return by_model[status]
        if status >= 500:
            return by_model[500]
        if status in (400, 422):
            return f"The model {m} refused the request as invalid."
    text = _BY_STATUS.get(status)
    if text is None:
        text = _BY_STATUS[500] if status >= 500 else _BY_STATUS[400]
    return text


def scrub(message: str, status: int) -> str:
    """The message, or a generic one of its status if it leaks; capped in length."""
    if leaks(message):
        log.warning("error message withheld from the client (HTTP %d): %s", status, message)
        return generic(status)
    if len(message) > MAX_MESSAGE:
        return message[:MAX_MESSAGE] + "…"
    return message


def public_error(exc: ServingError, model: str, request_id: str) -> ServingError:
    """An engine's error as the client sees it: a 5xx always becomes a message naming
    the model; a 4xx keeps its text unless it leaks. The original is logged with the
    request id whenever it is replaced. An error whose message was written for the client
    (`public`, e.g. the fast-fail 503 of a model with no worker left) passes as is: a log
    line and two regex scans per request were most of that 503's cost during an outage,
    and an outage would write one warning per request (bench/outage.py)."""
    if exc.public or (exc.status < 500 and not leaks(exc.message)):
        return exc
    log.warning(
        "request %s: model %s answered %d; client sees a generic message; original: %s",
        request_id,
        model,
        exc.status,
        exc.message,
    )
    out = copy.copy(exc)
    out.message = generic(exc.status, model)
    out.args = (out.message,)
    return out
