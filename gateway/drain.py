"""Drain on SIGTERM: the uvicorn server `gateway serve` runs.

Owns the shutdown sequence of the process:

1. SIGTERM (or the first Ctrl-C, or SIGHUP): readiness (`/health/ready`) answers 503 at once
   (`ServedModels.draining`), while the listener keeps accepting and serving for
   `GATEWAY_DRAIN_ACCEPT_S`, so a load balancer sees the 503 and stops sending before any
   connection is refused;
2. then uvicorn's own graceful shutdown: the listener closes and in-flight requests
   (streams included) get up to `GATEWAY_DRAIN_SECONDS` to finish;
3. then the app's lifespan stops the engines: launched workers get SIGTERM and their
   `stop_grace_s` + `stop_margin_s` to drain before SIGKILL (`engines.launch.supervisor`).

A second signal skips the accept window. Kubernetes' terminationGracePeriodSeconds must
cover accept + timeout + the workers' grace. Does not own readiness itself
(`gateway.api.ops`) or the engines' stop.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn

__all__ = ["DrainingServer"]

log = logging.getLogger("gateway.drain")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with an accept window between SIGTERM and the listener's close."""

    def __init__(self, config: uvicorn.Config, served: Any, accept_s: float) -> None:
        super().__init__(config)
        # None: the app is built in this process by uvicorn (a front door of
        # `serve --workers N`), its served models are found on it at the signal.
        self._served = served
        self.accept_s = accept_s
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's SIGINT/SIGTERM handling, and SIGHUP as SIGTERM: a closed terminal
        (or a hangup sent to the process group) stops the process with its drain, where
        Python's default would end it mid-request and uvicorn's supervisor would restart
        its processes."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGHUP, self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._timer is not None or self.accept_s <= 0 or self.should_exit:
            if self._timer is not None:
                self._timer.cancel()
            super().handle_exit(sig, frame)
            return
        self.served().draining = True
        log.warning(
            "%s: draining — readiness 503 now, accepting for %g s more, then closing",
            signal.Signals(sig).name,
            self.accept_s,
        )
        self._timer = threading.Timer(self.accept_s, super().handle_exit, (sig, frame))
        self._timer.daemon = True
        self._timer.start()

    def served(self) -> Any:
        if self._served is not None:
            return self._served
        app = self.config.loaded_app
        while not hasattr(app, "gateway") and hasattr(app, "app"):  # uvicorn's wrappers
            app = app.app
        return app.gateway.served
