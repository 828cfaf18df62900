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

The direct path (optional for engines): once the first block is out, the gateway may set
`GenerateRequest.direct`, a function taking a run of plain events — whole one-line
`data: {json}` chunks ending in a blank line, not `[DONE]`, not an error, `usage` absent or
null — and returning True when it has delivered them to the client, False when it cannot
now (the engine then yields that event as usual, and order is kept: an engine only offers
an event while nothing it received is still waiting to be yielded). An engine that reads
its upstream in a protocol callback offers events there, so a plain chunk costs no task
wake-up (`engines.upstream.http1`, `Stream.set_sink`); engines that ignore it lose nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from engines.errors import (
    AdapterError,
    AdapterNotFound,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    ServingError,
    UpstreamError,
)
from engines.spec import ModelSpec, SpecIssue

__all__ = [
    "MISCONFIGURED",
    "AdapterError",
    "AdapterNotFound",
    "Attempt",
    "Completed",
    "EmbedRequest",
    "Engine",
    "EngineBase",
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
    "TraceContext",
    "UpstreamError",
    "Usage",
    "WorkerStatus",
]


# --------------------------------------------------------------------------- data types


# Where an engine runs (`Engine.placement`).
Placement = Literal["in_process", "launched", "attached"]


@dataclass(slots=True)
class Attempt:
    """One try of a traced request on one worker (`TraceContext.attempt`)."""

    worker: str  # the worker's base URL
    reason: str  # the routing rule that picked it (`gateway_routing_decisions`' reasons)
    span_id: bytes  # 16 hex digits: the parent of the worker's own spans
    start: float  # time.perf_counter()
    end: float = 0.0  # 0.0: it served the request and ends with it
    error: str = ""
    continuation: bool = False  # a mid-stream continuation rather than a first try or retry


@dataclass(slots=True)
class TraceContext:
    """The W3C trace context of a request the gateway traces (`gateway.tracing`), handed to
    the engine so a worker's own spans join the gateway's trace. Engines that send to
    workers note each attempt here and send its `traceparent` header: every attempt has a
    span id of its own, so a retry's or continuation's spans on the worker hang under that
    attempt. Engines that ignore it lose nothing."""

    trace_id: bytes  # 32 lower-case hex digits
    flags: bytes  # b"01" sampled, b"00" not (the worker then records nothing either)
    attempts: list[Attempt] = field(default_factory=list)

    def attempt(self, worker: str, reason: str, continuation: bool = False) -> bytes:
        """Note an attempt starting now on `worker`; the `traceparent` value to send."""
        span = b"%016x" % (random.getrandbits(64) or 1)
        self.attempts.append(
            Attempt(worker, reason, span, time.perf_counter(), 0.0, "", continuation)
        )
        return b"00-%s-%s-%s" % (self.trace_id, span, self.flags)

    def failed(self, error: str) -> None:
        """The last attempt failed now (before or after its first byte), with `error`."""
        if self.attempts:
            last = self.attempts[-1]
            if not last.end:
                last.end = time.perf_counter()
                last.error = error


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
    # The session key for session-affine routing (the header the model's `routing:` names),
    # filled by the gateway only when that model routes by session.
    session: str | None = None
    # Filled by engines that pick among workers, for the gateway's access log: which
    # worker answered (its base URL; logs only, never a client) and how many attempts
    # failed before it.
    worker: str | None = None
    retries: int = 0
    # The gateway's direct path for plain events (module docstring), None until the
    # stream's first block is out and again once its relay ends.
    direct: Callable[[bytes], bool] | None = None
    # Set only when the gateway traces (`gateway.tracing`): engines that send to workers
    # note their attempts in it and send each one's `traceparent`.
    trace: TraceContext | None = None
    # Set (empty) by the gateway when a ledger bills the stream: an engine that relays a
    # worker appends the whole events the worker sent after the client left (it reads
    # them off the half-closed connection), so a cut stream is counted as the worker
    # counted it.
    tail: list[bytes] | None = None


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


# How `WorkerStatus.detail` starts for a worker that answers but cannot serve the model as
# configured (e.g. it serves another model name): not healthy, not routed to; `/health`
# and the status page call it "misconfigured" rather than "down".
MISCONFIGURED = "misconfigured: "


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
    # Failure handling: taken out of routing by outlier ejection (and how often so far),
    # restarts of a launched worker process, the last failure seen, requests in flight.
    ejected: bool = False
    ejections: int = 0
    restarts: int = 0
    last_error: str = ""
    outstanding: int = 0


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
    # Monotonic counters the gateway exports as metrics (name → total so far), e.g.
    # "retries", "retry_budget_exhausted", "ejections"; engines fill what they have.
    counters: dict[str, float] = field(default_factory=dict)
    # Routing decisions so far by reason (engines that pick among workers:
    # `engines.upstream.routing.router`), e.g. "least_loaded", "prefix_affinity", "retry".
    decisions: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class EngineContext:
    """What the gateway hands every engine: where to cache, how to report progress."""

    cache_dir: Path
    # Directory of models.yaml: relative model and adapter paths resolve against it.
    config_dir: Path
    # Engines call this with human-readable progress lines during long starts.
    progress: Any = print


# --------------------------------------------------------------------------- the Protocol


class Engine(Protocol):
    """What every engine implements. One instance serves one models.yaml entry (all its
    replicas or endpoints, and its adapters). `EngineBase` gives the defaults, so a new
    engine writes only what it does."""

    spec: ModelSpec

    # What the engine is, for the gateway, which never names an engine:
    # - placement: "in_process" (runs inside the process that serves it: transformers,
    #   sim), "launched" (launches worker processes: vllm, lmdeploy; attached by URL instead
    #   when models.yaml lists endpoints), "attached" (relays to running servers: openai);
    # - takes_cache_salt: its workers take the per-request `cache_salt` (vLLM's prefix-cache
    #   domain), so the gateway may set one per tenant.
    placement: ClassVar[Placement]
    takes_cache_salt: ClassVar[bool]

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        """Cheap: no loading, launching or I/O (that is `start`)."""
        ...

    @classmethod
    def attach_entry(
        cls, entry: dict[str, Any], host: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """For a "launched" engine with several front doors: (the models.yaml entry the
        launching process keeps, its workers' ports fixed; the entry a front door attaches
        to those workers with)."""
        ...

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        """Objections to a spec this engine cannot serve; checked at config load, without
        importing heavy dependencies or starting anything."""
        ...

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        """The exact worker command lines this spec launches (empty when nothing is)."""
        ...

    @classmethod
    def prefetch(cls, spec: ModelSpec, context: EngineContext) -> str | None:
        """Fetch (download, convert) what `start` will need, without serving; a line for
        `gateway pull`, or None when the engine has nothing to fetch."""
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

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's `POST /tokenize`: `body` has `prompt` (a string) or chat `messages`
        (+ `add_generation_prompt`, `continue_final_message`, `tools`),
        `add_special_tokens`, `return_token_strs`; the answer is `{"count",
        "max_model_len", "tokens", "token_strs"}` with the model's own tokenizer (and chat
        template). Optional: `EngineBase` refuses it."""
        ...

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's `POST /detokenize`: `body["tokens"]` → `{"prompt": text}`."""
        ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adopt_adapter(self, name: str, path: str) -> None:
        """Record an adapter another front door loaded onto the same workers, without a
        worker call (where adapters are placed on demand, the first request for it here
        loads it where it is missing)."""
        ...

    def forget_adapter(self, name: str) -> None:
        """Forget an adapter another front door unloaded (no worker call)."""
        ...

    def adapters(self) -> list[str]:
        """Names of the adapters loaded now."""
        ...

    def status(self) -> EngineStatus: ...


def _no_progress(*_args: Any, **_kw: Any) -> None:
    return None


class EngineBase:
    """Default behaviour for the `Engine` contract: accepts every spec, launches and
    prefetches nothing, serves no embeddings, no adapters and no /tokenize (each refused
    with a clear error). Subclasses override what they do; `complete`, `stream` and
    `status` have no sensible default and must be written."""

    placement: ClassVar[Placement] = "in_process"
    takes_cache_salt: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        self.spec = spec
        self.context = context
        self.progress: Any = context.progress if context is not None else _no_progress

    @classmethod
    def attach_entry(
        cls, entry: dict[str, Any], host: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        raise TypeError(f"engine {entry.get('engine')!r} launches no workers to attach to")

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        return []

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        return []

    @classmethod
    def prefetch(cls, spec: ModelSpec, context: EngineContext) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def complete(self, req: GenerateRequest) -> Completed:
        raise NotImplementedError

    def stream(self, req: GenerateRequest) -> EngineStream:
        raise NotImplementedError

    async def embed(self, req: EmbedRequest) -> Completed:
        raise InvalidRequest(
            f"The model `{self.spec.name}` does not serve embeddings.", param="model"
        )

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequest(
            f"The model `{self.spec.name}` does not serve /tokenize (its engine has no "
            "tokenizer the gateway can reach).",
            param="model",
        )

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequest(
            f"The model `{self.spec.name}` does not serve /detokenize (its engine has no "
            "tokenizer the gateway can reach).",
            param="model",
        )

    async def load_adapter(self, name: str, path: str) -> None:
        raise AdapterError(
            f"The model `{self.spec.name}` does not take LoRA adapters.", param="lora_name"
        )

    async def unload_adapter(self, name: str) -> None:
        raise AdapterError(
            f"The model `{self.spec.name}` does not take LoRA adapters.", param="lora_name"
        )

    def adopt_adapter(self, name: str, path: str) -> None:
        return None

    def forget_adapter(self, name: str) -> None:
        return None

    def adapters(self) -> list[str]:
        return []

    def status(self) -> EngineStatus:
        raise NotImplementedError
