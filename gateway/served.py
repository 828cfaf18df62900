"""What is served right now: the engines built from models.yaml and the adapters on them.

Owns the name → engine table (base models and their loaded adapters), starting and
stopping the engines, and adapter load/unload bookkeeping. A model whose engine fails to
start never takes the process down: it is listed as not ready (requests to it get 503 with
Retry-After) and its start is retried in the background with a growing delay, while the
other models serve. It does not validate adapter
paths (`gateway.adapters`) nor speak HTTP (`gateway.api`). The app's lifespan owns the one
instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from engines import engine_class
from engines.base import (
    AdapterError,
    AdapterNotFound,
    Engine,
    EngineContext,
    EngineStatus,
    EngineUnavailable,
)
from engines.spec import ModelSpec
from gateway.catalog import Catalog
from gateway.errors import InvalidRequest, ModelNotFound

log = logging.getLogger("gateway.served")


@dataclass(slots=True)
class Target:
    """Where a model name leads: the engine, its spec, and the adapter if it is one."""

    engine: Engine
    spec: ModelSpec
    adapter: str | None = None


@dataclass(slots=True)
class Pending:
    """A model whose engine has not started (yet): its last error and the retry task."""

    engine: Engine
    error: str = ""
    attempts: int = 0
    next_try: float = 0.0
    task: asyncio.Task[None] | None = None


# Background start retries: first after this many seconds, doubling up to the cap.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


@dataclass
class ServedModels:
    catalog: Catalog
    context: EngineContext
    engines: dict[str, Engine] = field(default_factory=dict)
    _targets: dict[str, Target] = field(default_factory=dict)
    _defaults: dict[str, dict[str, float]] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    pending: dict[str, Pending] = field(default_factory=dict)
    retry_first_s: float = RETRY_FIRST_S
    # Set on SIGTERM: readiness answers 503 from then on.
    draining: bool = False

    async def start(self) -> None:
        """Start every engine at once (GPU workers take minutes each; they overlap). One
        that fails is retried in the background (`Pending`); this never raises for it."""
        engines: list[Engine] = []
        for spec in self.catalog.models:
            cls = engine_class(spec.engine)
            engines.append(cls(spec, self.context))
        results = await asyncio.gather(
            *(self._start_one(e) for e in engines), return_exceptions=True
        )
        for engine, r in zip(engines, results, strict=True):
            if isinstance(r, BaseException):
                self._failed(engine, r)
            else:
                self._serve(engine)

    def _serve(self, engine: Engine) -> None:
        spec = engine.spec
        self.pending.pop(spec.name, None)
        self.engines[spec.name] = engine
        self._targets[spec.name] = Target(engine, spec)
        for name in engine.adapters():
            self._targets[name] = Target(engine, spec, name)

    def _failed(self, engine: Engine, exc: BaseException) -> None:
        name = engine.spec.name
        p = self.pending.get(name) or Pending(engine)
        self.pending[name] = p
        p.attempts += 1
        p.error = str(exc) or repr(exc)
        delay = min(RETRY_MAX_S, self.retry_first_s * 2 ** (p.attempts - 1))
        p.next_try = time.monotonic() + delay
        msg = f"model {name!r} failed to start ({p.error}); not ready, retrying in {delay:g} s"
        log.error("%s", msg)
        self.context.progress(msg)
        p.task = asyncio.get_running_loop().create_task(
            self._retry(p, delay), name=f"start-retry:{name}"
        )

    async def _retry(self, p: Pending, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._start_one(p.engine)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed(p.engine, e)
            return
        self._serve(p.engine)

    async def _start_one(self, engine: Engine) -> None:
        spec = engine.spec
        self.context.progress(f"starting model {spec.name!r} on engine {spec.engine}")
        t0 = time.perf_counter()
        await engine.start()
        self.context.progress(f"model {spec.name!r} ready in {time.perf_counter() - t0:.1f} s")

    async def stop(self) -> None:
        for p in self.pending.values():
            if p.task is not None:
                p.task.cancel()
        tasks = [p.task for p in self.pending.values() if p.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pending.clear()
        engines, self.engines = list(self.engines.values()), {}
        self._targets.clear()
        results = await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("engine stop failed: %r", r)

    def resolve(self, name: Any) -> Target:
        if name is None:
            raise InvalidRequest("Missing required parameter: 'model'.", param="model")
        if not isinstance(name, str):
            raise InvalidRequest("'model' must be a string.", param="model")
        target = self._targets.get(name)
        if target is None:
            p = self.pending.get(name) if isinstance(name, str) else None
            if p is not None:
                raise EngineUnavailable(
                    f"The model `{name}` is not ready (its start is retried).",
                    retry_after=max(1.0, p.next_try - time.monotonic()),
                )
            raise ModelNotFound(str(name))
        return target

    def base_for_adapter(self, base_model: str | None) -> Target:
        """The base model an adapter request names, or the only LoRA-enabled one."""
        if base_model is not None:
            target = self.resolve(base_model)
            if target.adapter is not None:
                raise AdapterError(
                    "'base_model' names an adapter, not a base model.", param="base_model"
                )
            return target
        lora = [t for n, t in self._targets.items() if t.adapter is None and t.spec.lora]
        if len(lora) == 1:
            return lora[0]
        if not lora:
            raise AdapterError(
                "No served model is configured for LoRA adapters.", param="base_model"
            )
        raise AdapterError(
            "Several models take adapters; name one in 'base_model'.", param="base_model"
        )

    async def load_adapter(self, base: Target, name: str, path: str) -> None:
        if name in self._targets:
            raise AdapterError(
                f"The name `{name}` is already served; unload it first.", param="lora_name"
            )
        await base.engine.load_adapter(name, path)
        self._targets[name] = Target(base.engine, base.spec, name)

    async def unload_adapter(self, name: str) -> None:
        target = self._targets.get(name)
        if target is None or target.adapter is None:
            raise AdapterNotFound(
                f"No adapter named `{name}` is loaded.", param="lora_name", code="adapter_not_found"
            )
        await target.engine.unload_adapter(name)
        del self._targets[name]

    def serves(self, name: str) -> bool:
        return name in self._targets

    def register_adapter(self, base_name: str, name: str, path: str) -> bool:
        """Serve an adapter another process loaded onto the same workers (no worker call:
        the engine only records it); False when the base model is not served here."""
        base = self._targets.get(base_name)
        if base is None or base.adapter is not None or name in self._targets:
            return False
        base.engine.adopt_adapter(name, path)
        self._targets[name] = Target(base.engine, base.spec, name)
        return True

    def forget_adapter(self, name: str) -> None:
        target = self._targets.get(name)
        if target is not None and target.adapter is not None:
            target.engine.forget_adapter(name)
            del self._targets[name]

    def request_defaults(self, name: str) -> dict[str, float]:
        """The model's sampling defaults as body fields (computed once per model)."""
        cached = self._defaults.get(name)
        if cached is None:
            cached = self._defaults[name] = self._targets[name].spec.request_defaults.as_body()
        return cached

    def listing(self) -> list[dict[str, Any]]:
        """`/v1/models` entries: base models, then adapters with `parent` set."""
        out = []
        for name, t in self._targets.items():
            out.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "gateway",
                    "root": name
                    if t.adapter is not None
                    else (t.spec.model or t.spec.upstream_name),
                    "parent": t.spec.name if t.adapter is not None else None,
                    "max_model_len": t.spec.max_model_len,
                }
            )
        return out

    def statuses(self) -> dict[str, EngineStatus]:
        out = {name: e.status() for name, e in self.engines.items()}
        for name, p in self.pending.items():
            out[name] = EngineStatus(
                ready=False,
                detail=f"not started after {p.attempts} attempt(s): {p.error}",
                counters={"start_failures": p.attempts},
            )
        return out

    def adapter_counts(self) -> dict[str, int]:
        return {name: len(e.adapters()) for name, e in self.engines.items()}
