"""The engine contract: the one interface the gateway talks to, and its data types.

Owns: the `Engine` Protocol every engine implements, the request/response types that cross
it, and the root of the exception tree (`ServingError`) that every layer raises. It does not
own HTTP, validation of client input, routing or metrics: those are the gateway's.

The streaming contract, chosen so HTTP engines can relay upstream bytes untouched:
`Engine.stream()` yields `bytes`, each one or more complete Server-Sent Events
(`data: {json}\\n\\n`) in the OpenAI chunk format, never `data: [DONE]` (the gateway ends the
stream). The gateway always asks engines for a final usage chunk
(`stream_options.include_usage`) and drops it again when the client did not ask.
An error before the first yield surfaces from the first `__anext__()`, so the gateway can
still answer with an HTTP status; after it, the gateway ends the stream with an error event.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from engines.spec import ModelSpec, SpecIssue

__all__ = [
    "AdapterError",
    "Completed",
    "EmbedRequest",
    "Engine",
    "EngineContext",
    "EngineOverloaded",
    "EngineStatus",
    "EngineStream",
    "EngineTimeout",
    "EngineUnavailable",
    "GenerateRequest",
    "InvalidRequest",
    "ModelSpec",
    "ServingError",
    "SpecIssue",
    "UpstreamError",
    "Usage",
    "WorkerStatus",
]


# --------------------------------------------------------------------------- errors


class ServingError(Exception):
    """Root of the one exception tree. Each subclass fixes the HTTP status and OpenAI
    error `type`; `gateway.errors` turns any of them into the OpenAI error envelope."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServingError):
    """The request is wrong (the engine found out, e.g. prompt longer than the context)."""

    status = 400
    type = "invalid_request_error"


class AdapterError(InvalidRequest):
    """An adapter cannot be loaded, unloaded or used as asked."""


class UpstreamError(ServingError):
    """A worker failed or answered with something that is not a valid response."""

    status = 502
    type = "upstream_error"


class EngineUnavailable(ServingError):
    """No worker can take the request now (starting, dead, draining)."""

    status = 503
    type = "service_unavailable"


class EngineOverloaded(ServingError):
    """The engine's queue is full; the client should retry later."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class EngineTimeout(ServingError):
    status = 504
    type = "timeout"


# --------------------------------------------------------------------------- data types


@dataclass(slots=True)
class GenerateRequest:
    """A validated chat or completion request on its way to an engine."""

    route: Literal["chat", "completions"]
    # The request body with OpenAI's field names, already validated and bounded by the
    # gateway; `stream_options.include_usage` is always true here.
    body: dict[str, Any]
    # The name the client asked for: the base model's, or an adapter's.
    model: str
    # The adapter to apply, when `model` names one.
    adapter: str | None
    request_id: str
    created: int


@dataclass(slots=True)
class EmbedRequest:
    body: dict[str, Any]
    model: str
    request_id: str
    # The inputs, normalised: a list of strings or a list of token-id lists.
    inputs: list[str] | list[list[int]]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Completed:
    """A whole response: the JSON body exactly as the client receives it."""

    body: bytes
    usage: Usage | None = None


# An async generator, so the gateway can close it (`aclose`) when the client leaves.
EngineStream = AsyncGenerator[bytes, None]


@dataclass(slots=True)
class WorkerStatus:
    """One worker process or endpoint behind an engine."""

    url: str
    healthy: bool
    detail: str = ""
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # 0..1
    spec_accepted_tokens: float | None = None
    spec_draft_tokens: float | None = None


@dataclass(slots=True)
class EngineStatus:
    ready: bool
    detail: str = ""
    # Sequences running in the current batch / waiting for a slot (embedded engine).
    running: int = 0
    waiting: int = 0
    # Largest batch one forward step has run so far (proves batching in tests).
    max_batch_seen: int = 0
    workers: list[WorkerStatus] = field(default_factory=list)


@dataclass(slots=True)
class EngineContext:
    """What the gateway hands every engine: where to cache, how to report progress."""

    cache_dir: Path
    # Directory of models.yaml: relative model and adapter paths resolve against it.
    config_dir: Path
    # Engines call this with human-readable progress lines during long starts.
    progress: Any = print


# --------------------------------------------------------------------------- the Protocol


@runtime_checkable
class Engine(Protocol):
    """What every engine implements. One instance serves one models.yaml entry (all its
    replicas or endpoints, and its adapters)."""

    spec: ModelSpec

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        """Objections to a spec this engine cannot serve; checked at config load, without
        importing heavy dependencies or starting anything."""
        ...

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        """The exact worker command lines this spec launches (empty when nothing is)."""
        ...

    async def start(self) -> None:
        """Load, launch or attach; return when requests can be served."""
        ...

    async def stop(self) -> None:
        """Drain and release every resource (processes, sessions, threads)."""
        ...

    async def complete(self, req: GenerateRequest) -> Completed:
        """A whole, non-streamed response."""
        ...

    def stream(self, req: GenerateRequest) -> EngineStream:
        """A streamed response (see the module docstring for the byte contract).
        Closing the iterator (client gone) must stop the work at once."""
        ...

    async def embed(self, req: EmbedRequest) -> Completed: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[str]:
        """Names of the adapters loaded now."""
        ...

    def status(self) -> EngineStatus: ...
