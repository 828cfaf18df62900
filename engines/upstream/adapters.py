"""LoRA adapters across a model's workers, through vLLM's runtime API
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).

Owns the desired set of adapters for one model (`loaded`: name → path; the one piece of
state a multi-process gateway shares, e.g. in Redis) and its placement on the workers, in
one of two modes:

- everywhere (default): every adapter on every healthy worker, loaded all-or-nothing and
  re-applied to a worker that comes back;
- on demand (the model routes with `lora_affinity`): each worker holds at most
  `lora.max_adapters` adapters (`Endpoint.adapters`, least recently used first); a request
  for an adapter its worker lacks loads it there first (`ensure`), evicting that worker's
  least recently used adapter when its slots are full. Loading an adapter through the
  admin API checks it on one worker; a worker that comes back holds none.

Known gap: eviction does not wait for requests still running with the evicted adapter on
that worker (the LRU one is rarely in flight with several slots).

Does not own path checks (the gateway resolves adapter paths inside the allowed roots) or
which worker serves a request (`engines.upstream.routing`).
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

    def __init__(
        self,
        model: str,
        normalise: Normalise,
        timeout_s: float,
        on_demand: bool = False,
        slots: int = 4,
    ) -> None:
        self.model = model
        self.normalise = normalise
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.loaded: dict[str, str] = {}
        self.lock = asyncio.Lock()
        self.on_demand = on_demand
        self.slots = slots
        # Loads in progress per (worker, adapter): concurrent requests share one.
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._ep_locks: dict[str, asyncio.Lock] = {}
        # Totals for the metrics.
        self.loads = 0
        self.evictions = 0
        # Adapter requests that found their worker holding the adapter, and that did not.
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------- on-demand placement

    def holds(self, ep: Endpoint, name: str) -> bool:
        return name in ep.adapters

    def touch(self, ep: Endpoint, name: str) -> None:
        """Mark `name` most recently used on `ep`."""
        held = ep.adapters
        held.pop(name, None)
        held[name] = None

    async def ensure(self, session: aiohttp.ClientSession | None, ep: Endpoint, name: str) -> None:
        """Make `ep` hold adapter `name` (on-demand mode), evicting its least recently used
        adapter when its slots are full. Concurrent calls for one (worker, adapter) share
        one load."""
        if name in ep.adapters:
            self.hits += 1
            self.touch(ep, name)
            return
        self.misses += 1
        path = self.loaded.get(name)
        if path is None:
            raise AdapterNotFound(
                f"No adapter named `{name}` is loaded.", param="model", code="adapter_not_found"
            )
        key = (ep.url, name)
        pending = self._loading.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        # One load at a time per worker: slots are counted with no load half done.
        lock = self._ep_locks.setdefault(ep.url, asyncio.Lock())
        try:
            async with lock:
                while len(ep.adapters) >= self.slots:
                    victim = next(iter(ep.adapters))
                    del ep.adapters[victim]
                    self.evictions += 1
                    await self.call(session, ep, "unload", victim, tolerate=True)
                await self.call(session, ep, "load", name, path, tolerate=True)
                self.loads += 1
                self.touch(ep, name)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved here; waiters re-raise it
            raise
        finally:
            del self._loading[key]

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
        loaded' (a worker started with --lora-modules). On demand: only record them."""
        if self.on_demand:
            self.loaded.update(adapters)
            return
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
            if self.on_demand:
                # Check it on the least-loaded worker; later requests place it.
                self.loaded[name] = path
                ep = min(targets, key=lambda e: (len(e.adapters), e.outstanding))
                try:
                    await self.ensure(session, ep, name)
                except BaseException:
                    del self.loaded[name]
                    raise
                return
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
            if self.on_demand:
                targets = [ep for ep in targets if name in ep.adapters]
                for ep in targets:
                    ep.adapters.pop(name, None)
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
        """Load every adapter on a worker that came back (it may have restarted). On
        demand: it holds none now; requests place them again."""
        if self.on_demand:
            ep.adapters.clear()
            return
        for name, path in list(self.loaded.items()):
            await self.call(session, ep, "load", name, path, tolerate=True)
