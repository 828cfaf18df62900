"""The bounded admission queue per model: how many requests reach an engine at once.

Owns `Gate` (one model's limit: `admission.max_concurrent` at the engine, up to
`admission.max_queue` more waiting first come first served for `queue_timeout_s`) and
`Admission` (the gates of the served models). A request beyond the queue, or one that
waited too long, gets 503 with Retry-After in the OpenAI envelope at once — never a hang.
Queue waits go to the metrics. Does not own what an engine does with what it admits, nor
the per-client rate limits.

Cost on the hot path: a model without `admission:` pays one dict lookup; with it, an
integer compare when a slot is free (no future, no timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from engines.errors import EngineUnavailable
from engines.spec import AdmissionSpec, ModelSpec

__all__ = ["Admission", "Gate"]


class Gate:
    """One model's concurrency limit with a bounded FIFO queue behind it."""

    __slots__ = ("active", "model", "observe", "reject", "spec", "waiters")

    def __init__(
        self,
        model: str,
        spec: AdmissionSpec,
        observe: Callable[[float], None],
        reject: Callable[[], None],
    ):
        self.model = model
        self.spec = spec
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.observe = observe
        self.reject = reject

    async def enter(self) -> None:
        spec = self.spec
        if self.active < spec.max_concurrent and not self.waiters:
            self.active += 1
            self.observe(0.0)
            return
        if len(self.waiters) >= spec.max_queue:
            self.reject()
            raise EngineUnavailable(
                f"The model `{self.model}` is at capacity ({spec.max_concurrent} running, "
                f"{len(self.waiters)} queued); retry later.",
                retry_after=spec.retry_after_s,
                code="queue_full",
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(spec.queue_timeout_s):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.leave()  # granted in the same tick we gave up: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            if isinstance(e, TimeoutError):
                self.reject()
                raise EngineUnavailable(
                    f"The model `{self.model}` is at capacity: no slot within "
                    f"{spec.queue_timeout_s:g} s; retry later.",
                    retry_after=spec.retry_after_s,
                    code="queue_timeout",
                ) from None
            raise
        self.observe(time.perf_counter() - t0)

    def leave(self) -> None:
        self.active -= 1
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)
                break


class Admission:
    """The gates of the served models (only those with `admission:` in models.yaml)."""

    def __init__(
        self, observe: Callable[[str, float], None], reject: Callable[[str], None]
    ) -> None:
        self.gates: dict[str, Gate] = {}
        self._observe = observe
        self._reject = reject

    def add(self, spec: ModelSpec) -> None:
        if spec.admission is not None:
            name = spec.name
            self.gates[name] = Gate(
                name,
                spec.admission,
                lambda s: self._observe(name, s),
                lambda: self._reject(name),
            )
