"""LoRA adapters across a model's workers, through vLLM's runtime API
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).

Owns the desired set of adapters for one model (`loaded`: name → path), loading and
unloading them on every healthy worker all-or-nothing, and re-applying them to a worker
that comes back. Does not own path checks (the gateway resolves adapter paths inside the
allowed roots) or which worker serves an adapter (`engines.upstream.routing`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp
import orjson

from engines.base import AdapterError, AdapterNotFound, EngineUnavailable, ServingError
from engines.upstream.endpoints import Endpoint

__all__ = ["AdapterFanout"]

log = logging.getLogger("engines.upstream")

Normalise = Callable[[int, bytes], ServingError]


class AdapterFanout:
    """The adapters of one model and their application to its workers."""

    def __init__(self, model: str, normalise: Normalise, timeout_s: float) -> None:
        self.model = model
        self.normalise = normalise
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.loaded: dict[str, str] = {}
        self.lock = asyncio.Lock()

    async def call(
        self,
        session: aiohttp.ClientSession | None,
        ep: Endpoint,
        op: str,
        name: str,
        path: str | None = None,
        tolerate: bool = False,
    ) -> None:
        """The runtime LoRA API on one worker. `tolerate`: 'already loaded' (load) and
        'not found' (unload) count as success."""
        if session is None:
            raise EngineUnavailable(f"model {self.model!r} is not started")
        payload: dict[str, str] = {"lora_name": name}
        if op == "load":
            payload["lora_path"] = path or ""
        try:
            async with session.post(
                f"{ep.url}/v1/{op}_lora_adapter", data=orjson.dumps(payload), timeout=self.timeout
            ) as r:
                body, status = await r.read(), r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("%s adapter %r on %s: %r", op, name, ep.url, e)
            raise EngineUnavailable(
                f"model {self.model!r}: {op} adapter {name!r}: a worker is unreachable"
            ) from e
        if status == 200:
            return
        err = self.normalise(status, body)
        if tolerate and (
            (op == "load" and "already" in err.message.lower())
            or (op == "unload" and status == 404)
        ):
            return
        log.warning("%s adapter %r on %s answered %d: %s", op, name, ep.url, status, err.message)
        raise AdapterError(
            f"{op} adapter `{name}` failed on a worker: {err.message}", param="lora_name"
        )

    async def apply_start(
        self,
        session: aiohttp.ClientSession | None,
        endpoints: Sequence[Endpoint],
        adapters: Sequence[tuple[str, str]],
    ) -> None:
        """Load the adapters of models.yaml on every healthy endpoint, tolerating 'already
        loaded' (a worker started with --lora-modules)."""
        for name, path in adapters:
            await asyncio.gather(
                *(self.call(session, ep, "load", name, path, tolerate=True) for ep in endpoints)
            )
            self.loaded[name] = path

    async def load(
        self,
        session: aiohttp.ClientSession | None,
        endpoints: Sequence[Endpoint],
        name: str,
        path: str,
    ) -> None:
        async with self.lock:
            if name in self.loaded:
                raise AdapterError(f"The adapter `{name}` is already loaded.", param="lora_name")
            targets = [ep for ep in endpoints if ep.healthy]
            if not targets:
                raise EngineUnavailable(f"model {self.model!r}: no healthy worker")
            results = await asyncio.gather(
                *(self.call(session, ep, "load", name, path) for ep in targets),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                # All or nothing: take it off the workers that did load it.
                ok = [ep for ep, r in zip(targets, results, strict=True) if r is None]
                await asyncio.gather(
                    *(self.call(session, ep, "unload", name, tolerate=True) for ep in ok),
                    return_exceptions=True,
                )
                raise failed[0]
            self.loaded[name] = path

    async def unload(
        self, session: aiohttp.ClientSession | None, endpoints: Sequence[Endpoint], name: str
    ) -> None:
        async with self.lock:
            if name not in self.loaded:
                raise AdapterNotFound(
                    f"No adapter named `{name}` is loaded.",
                    param="lora_name",
                    code="adapter_not_found",
                )
            targets = [ep for ep in endpoints if ep.healthy]
            results = await asyncio.gather(
                *(self.call(session, ep, "unload", name, tolerate=True) for ep in targets),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            # Workers down now get nothing re-applied when they return, since it is gone.
            del self.loaded[name]

    async def reapply(self, session: aiohttp.ClientSession | None, ep: Endpoint) -> None:
        """Load every adapter on a worker that came back (it may have restarted)."""
        for name, path in list(self.loaded.items()):
            await self.call(session, ep, "load", name, path, tolerate=True)
