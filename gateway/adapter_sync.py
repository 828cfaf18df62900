"""Adapter desired state shared by every front door, kept in the state store.

A LoRA adapter loaded through one gateway process (`POST /v1/load_lora_adapter`) is
written to the store's `adapters` map (name → base model and path); every process polls
the map each `INTERVAL_S` and serves what it lists — registering the name on its base
model's engine without loading it again, since the workers behind (the control process
under `--workers`, or the shared upstream workers) already hold it; an engine that places
adapters on demand (LoRA affinity) records the path and loads it on a worker that lacks
it at the first request — and stops serving what was unloaded. A front door that
restarts or joins reads the map at start-up.

Active when the state is shared (Redis, or more than one front door); with the in-memory
store and one process there is nobody to tell. Re-loading adapters into workers that
restart is the engines' (`engines.upstream.adapters`); this module only keeps the
front doors' name tables in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from gateway.state_store import StoreUnavailable

if TYPE_CHECKING:
    from gateway.limits import Tenancy
    from gateway.served import ServedModels

log = logging.getLogger("gateway.adapter_sync")

MAP = "adapters"
INTERVAL_S = 1.0


class AdapterSync:
    def __init__(self, served: ServedModels, tenancy: Tenancy, enabled: bool):
        self.served = served
        self.tenancy = tenancy
        self.enabled = enabled
        self._task: asyncio.Task[None] | None = None
        self._synced: set[str] = set()  # names this process serves because the map says so

    async def recorded(self, base: str, name: str, path: str) -> None:
        """An adapter was loaded through this process: tell the others."""
        if self.enabled:
            with contextlib.suppress(StoreUnavailable):
                await self.tenancy.store.map_set(
                    MAP, name, json.dumps({"base": base, "path": path})
                )

    async def removed(self, name: str) -> None:
        if self.enabled:
            self._synced.discard(name)
            with contextlib.suppress(StoreUnavailable):
                await self.tenancy.store.map_delete(MAP, name)

    async def sync_once(self) -> None:
        desired = await self.tenancy.store.map_all(MAP)
        served = self.served
        for name, raw in desired.items():
            if served.serves(name):
                continue
            entry = json.loads(raw)
            if served.register_adapter(entry["base"], name, entry["path"]):
                self._synced.add(name)
                log.info(
                    "serving adapter %r on %r (loaded through another process)",
                    name,
                    entry["base"],
                )
        for name in list(self._synced - desired.keys()):
            served.forget_adapter(name)
            self._synced.discard(name)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):
                await self.sync_once()
            await asyncio.sleep(INTERVAL_S)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
