"""Engine "sim": the vLLM simulator run in process, relayed to like any OpenAI upstream.

Owns the mapping of a models.yaml entry (`options:`, batching, speculative) to simulator
servers, and their lifetime. The simulator itself (a test instrument) lives in the
top-level `simulator` package; this module is the only place the product touches it.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields, replace
from typing import Any, ClassVar

from pydantic import create_model

from engines.base import EngineContext, Placement, SpecIssue
from engines.options import EngineOptions
from engines.spec import ModelSpec
from engines.upstream.engine import OpenAIEngine
from engines.upstream.options import UpstreamOptions
from engines.upstream.routing.kv_events import EventSource
from simulator.config import SimConfig, config_problems
from simulator.server import SimServer

_SIM_OPTIONS = {f.name for f in fields(SimConfig)} - {"model"}


def _sim_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(SimConfig)
    out: dict[str, Any] = {}
    for f in fields(SimConfig):
        if f.name == "model":
            continue
        default: Any = f.default
        if default is MISSING:
            default = f.default_factory()  # type: ignore[operator]
        out[f.name] = (hints[f.name], default)
    return out


# The relay's options plus every SimConfig field (ranges: `config_problems`).
SimOptions: type[EngineOptions] = create_model(
    "SimOptions", __base__=UpstreamOptions, **_sim_fields()
)


class SimEngine(OpenAIEngine):
    """Engine "sim": launches `replicas` simulator servers on loopback in this process and
    relays to them like any OpenAI-compatible upstream. `options:` take SimConfig's fields
    (ttft_ms, itl_ms, jitter, ...) besides OpenAIEngine's own options; `batching.max_sequences`
    sets `max_running` when given, `speculative.num_speculative_tokens` turns on the
    spec-decode counters."""

    options_model: ClassVar[type[EngineOptions]] = SimOptions
    # Servers in this process; they take vLLM's `cache_salt`.
    placement: ClassVar[Placement] = "in_process"
    takes_cache_salt: ClassVar[bool] = True
    # With `kv_cache_hit` on, every server publishes its prefix cache's events.
    kv_events_mode: ClassVar[str] = "launch"
    kv_tokenizer: ClassVar[str] = "words"

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        self._servers: list[SimServer] = []

    @classmethod
    def sim_config(cls, spec: ModelSpec) -> SimConfig:
        kw = {k: v for k, v in spec.options.items() if k in _SIM_OPTIONS}
        if "words" in kw:
            kw["words"] = tuple(kw["words"])
        if "max_running" not in kw and "batching" in spec.model_fields_set:
            kw["max_running"] = spec.batching.max_sequences
        if "spec_tokens" not in kw and spec.speculative is not None:
            kw["spec_tokens"] = spec.speculative.num_speculative_tokens
        if "max_model_len" not in kw:
            kw["max_model_len"] = spec.max_model_len
        if "kv_events_port" not in kw and spec.routing.scorers.get("kv_cache_hit"):
            kw["kv_events_port"] = 0  # each server on free ports
        return SimConfig(model=spec.upstream_name, **kw)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues: list[SpecIssue] = []
        if spec.endpoints:
            issues.append(
                SpecIssue(
                    path="endpoints",
                    message="the sim engine launches its own servers; to attach to a running "
                    "simulator use engine: openai",
                )
            )
        if spec.engine_args:
            issues.append(SpecIssue(path="engine_args", message="not used by the sim engine"))
        issues += cls.check_options(spec)
        if not issues:
            try:
                cfg = cls.sim_config(spec)
            except (TypeError, ValueError) as e:
                msg = str(e)
                key = msg.split(":", 1)[0] if ":" in msg else ""
                issues.append(SpecIssue(path=f"options.{key}" if key else "options", message=msg))
            else:
                for key, msg in config_problems(cfg):
                    issues.append(SpecIssue(path=f"options.{key}", message=msg))
        return issues

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        return []  # in process: nothing is launched as a command

    async def start_workers(self) -> list[str]:
        config = self.sim_config(self.spec)
        for i in range(self.spec.replicas):
            server = SimServer(
                replace(config, seed=None if config.seed is None else config.seed + i)
            )
            self._servers.append(server)
            await server.start("127.0.0.1", 0)
        self.progress(
            f"sim: {len(self._servers)} SIMULATOR server(s) for {self.spec.name!r} at "
            + ", ".join(s.url for s in self._servers)
        )
        return [s.url for s in self._servers]

    def kv_event_sources(self, urls: list[str]) -> list[EventSource | None]:
        """Each server's KV-event publisher (None when it publishes none)."""
        return [
            EventSource(s.kv_events.endpoint, s.kv_events.replay_endpoint)
            if s.kv_events is not None
            else None
            for s in self._servers
        ]

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            servers, self._servers = self._servers, []
            for server in servers:
                await server.stop()

    @property
    def servers(self) -> list[SimServer]:
        return list(self._servers)
