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

__all__ = ["SSEBuffer", "split_events"]


class SSEBuffer:
    """Accumulates upstream bytes; `feed()` returns every complete event available now as
    one bytes run (possibly several events, each ending in `\\n\\n`), or b"" if none.
    `pending` holds the bytes of an incomplete event (a plain attribute: the stream
    relay's direct path reads it once per chunk)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        if self.pending:
            data = self.pending + data
        if b"\r" in data:
            # CRLF → LF. A CR ending this read stays in the buffer until its LF arrives.
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self.pending = data
            return b""
        end += 2
        if end == len(data):
            self.pending = b""
            return data
        self.pending = data[end:]
        return data[:end]


def split_events(run: bytes) -> list[bytes]:
    """Single events (without their terminating blank line) of a run from `feed()`."""
    return [e for e in run.split(b"\n\n") if e]
