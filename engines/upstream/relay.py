"""The stream relay's slow path: SSE runs that need more than a byte copy.

The fast path (`engines.upstream.attempt.Attempt.relay`) yields each run of complete
events as the upstream sent it. A run comes here when it holds `[DONE]`, an
`"error"`, an SSE comment or a non-`data:` line, or when a rename / chunk transform is on.
Owns parsing such a run into the events the gateway forwards, and finding an upstream
error event inside it. Does not own reading, buffering or closing the upstream stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from engines.base import ServingError, UpstreamError
from engines.upstream.sse import split_events

__all__ = ["event_data", "plain_run", "process_run"]

Transform = Callable[[dict[str, Any]], dict[str, Any] | None]
ErrorOf = Callable[[dict[str, Any], bytes], ServingError]


def plain_run(run: bytes) -> bool:
    """Whether a run of whole events can be relayed as it is: it starts with `data: ` and
    holds no `[DONE]`, no `"error"` and no comment line."""
    return (
        run.startswith(b"data: ")
        and b"[DONE]" not in run
        and b'"error"' not in run
        and b"\n:" not in run
    )


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), None if it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [ln for ln in event.split(b"\n") if ln.startswith(b"data:")]
    if not lines:
        return None  # a comment, or only event:/id:/retry: fields
    return b"\n".join(ln[6:] if ln[5:6] == b" " else ln[5:] for ln in lines)


def process_run(
    run: bytes, rename: str | None, transform: Transform | None, error_of: ErrorOf
) -> tuple[bytes, bool, ServingError | None]:
    """Events of `run` as the gateway gets them, whether `[DONE]` was among them, and the
    ServingError an upstream error event stands for (the events before it are still
    delivered first). `transform` (or None) rewrites or drops each chunk."""
    out: list[bytes] = []
    done = False
    rewrite = rename is not None or transform is not None
    for event in split_events(run):
        data = event_data(event)
        if data is None:
            continue
        if data == b"[DONE]":
            done = True
            continue
        if rewrite or b'"error"' in data:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamError("upstream sent a stream event that is not JSON") from None
            if isinstance(obj, dict) and (
                ("error" in obj and "choices" not in obj) or obj.get("object") == "error"
            ):
                return b"".join(out), done, error_of(obj, data)
            if rewrite and isinstance(obj, dict):
                if rename is not None:
                    obj["model"] = rename
                new = transform(obj) if transform is not None else obj
                if new is None:
                    continue
                out.append(b"data: " + orjson.dumps(new) + b"\n\n")
                continue
        out.append(b"data: " + data + b"\n\n")
    return b"".join(out), done, None
