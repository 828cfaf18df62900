"""Request ids: unique across processes and restarts, cheap enough for the hot path."""

from __future__ import annotations

import itertools
import os

__all__ = ["RequestIds"]


class RequestIds:
    """Request ids unique across processes and restarts: a random per-process prefix and
    a counter (a uuid4 per request was 2.5% of the gateway's CPU under load)."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):010x}"
