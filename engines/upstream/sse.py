"""Splitting an upstream Server-Sent-Events byte stream into complete events.

Owns the byte-level framing of the upstream hop only: turning arbitrary TCP reads into runs
of complete events (`...\\n\\n`), normalising CRLF line ends, and taking a run apart into
single events when an event needs a closer look. It does not parse JSON, decide what an
event means, or frame anything for the client (the gateway's streaming module does that).

Hand-written on purpose: it runs once per upstream read on the streaming hot path, and the
fast case (a read that ends on an event boundary, no CR) costs one `rfind` and no copies;
an SSE library would build an object per event and decode to str.
"""

from __future__ import annotations

__all__ = ["SSEBuffer", "cut_events", "direct_run", "split_events"]


def cut_events(pending: bytes, data: bytes) -> tuple[bytes, bytes]:
    """`pending + data` cut after its last complete event: (complete events, the rest).
    CRLF line ends become LF; a CR ending the data stays in the rest until its LF comes.
    Pure: the caller decides whether to keep the rest (the direct path commits it only
    when its events were taken)."""
    if pending:
        data = pending + data
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    end = data.rfind(b"\n\n")
    if end < 0:
        return b"", data
    end += 2
    if end == len(data):
        return data, b""
    return data[:end], data[end:]


def direct_run(run: bytes) -> bool:
    """Whether a run of complete LF-framed events (from `cut_events`) is all plain chunks
    that may go to the client untouched: each event one `data: {...}` line, no `[DONE]`,
    no comment or other field, no `"error"` key, and `"usage"` only as null (OpenAI's API
    and several servers send `"usage":null` in every chunk once usage is asked for; a
    non-null usage must reach the relay loop, which reads it).

    Why counts: JSON text cannot hold a raw newline and escapes every quote inside a
    string, so `\n` counts prove one line per event, `\n\ndata: {` counts prove each
    starts as a chunk, and `"usage"` / `"error"` can only be keys. Each is one C-level
    scan of a few hundred bytes."""
    n = run.count(b"\n\n")
    if not (
        n
        and run.startswith(b"data: {")
        and run.count(b"\n") == 2 * n
        and (n == 1 or run.count(b"\n\ndata: {") == n - 1)
        and b'"error"' not in run
    ):
        return False
    if b'"usage"' not in run:
        return True
    return run.count(b'"usage"') == run.count(b'"usage":null') + run.count(b'"usage": null')


class SSEBuffer:
    """Accumulates upstream bytes; `feed()` returns every complete event available now as
    one bytes run (possibly several events, each ending in `\\n\\n`), or b"" if none.
    `pending` holds the bytes of an incomplete event (a plain attribute: the stream
    relay's direct path reads it once per chunk)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        if not self.pending and data.endswith(b"\n\n") and b"\r" not in data:
            return data  # the usual read: whole events, nothing to join or cut
        run, self.pending = cut_events(self.pending, data)
        return run


def split_events(run: bytes) -> list[bytes]:
    """Single events (without their terminating blank line) of a run from `feed()`."""
    return [e for e in run.split(b"\n\n") if e]
