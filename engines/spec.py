"""The typed schema of one served model, as written in models.yaml.

This is the contract between the gateway (which loads and validates models.yaml) and the
engines (which launch or attach what a spec describes). It owns field names, types,
defaults and engine-independent checks. It does not own file loading or error formatting
(`gateway.catalog`), nor what a particular engine can or cannot do (each engine's
`check_spec`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engines import ENGINES

Quantization = Literal["none", "awq", "gptq", "fp8"]


class _Strict(BaseModel):
    """Every section refuses unknown keys: a typo in models.yaml is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SpeculativeSpec(_Strict):
    method: Literal["ngram", "draft", "eagle", "eagle3"]
    num_speculative_tokens: int = Field(ge=1, le=32)
    # ngram: how long an n-gram of the prompt is looked up
    prompt_lookup_max: int | None = Field(default=None, ge=1)
    prompt_lookup_min: int | None = Field(default=None, ge=1)
    # draft / eagle: the draft model or head
    model: str | None = None
    draft_tensor_parallel_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _method_needs(self) -> SpeculativeSpec:
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("model: not used by method ngram (remove it)")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if lo is not None and hi is not None and lo > hi:
                raise ValueError("prompt_lookup_min: must be ≤ prompt_lookup_max")
        elif self.model is None:
            raise ValueError(f"model: method {self.method} needs a draft model or head")
        return self


NAME_PATTERN = r"^[A-Za-z0-9._:/-]+$"
_NAME_RE = re.compile(NAME_PATTERN)


def name_problem(name: str, max_length: int = 128) -> str | None:
    """Why a model or adapter name is refused, or None. Names may look like hub ids
    (`org/model`) but never like paths that climb (`../x`), start at the root or have
    empty segments."""
    if not name or len(name) > max_length or not _NAME_RE.match(name):
        return f"must be 1-{max_length} characters of letters, digits and . _ : / - (no spaces)"
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        return "must not have empty, '.' or '..' path segments"
    return None


def _valid_name(name: str, max_length: int) -> str:
    problem = name_problem(name, max_length)
    if problem is not None:
        raise ValueError(problem)
    return name


class AdapterSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _valid_name(v, 128)


class LoraSpec(_Strict):
    max_adapters: int = Field(default=4, ge=1, le=256)
    max_rank: int = Field(default=16, ge=1, le=512)
    # Adapters loaded when the model starts.
    adapters: list[AdapterSpec] = Field(default_factory=list)
    # Directories runtime-loaded adapter paths must resolve inside (after symlinks).
    roots: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fits(self) -> LoraSpec:
        if len(self.adapters) > self.max_adapters:
            raise ValueError(
                f"adapters: {len(self.adapters)} listed but max_adapters is {self.max_adapters}"
            )
        names = [a.name for a in self.adapters]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"adapters: duplicate name {sorted(dup)[0]!r}")
        return self


class RequestDefaults(_Strict):
    """Sampling fields applied to a request that leaves them out (the role of vLLM's
    generation config): a small model may need a lower temperature than OpenAI's 1.0."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)

    def as_body(self) -> dict[str, float]:
        return {
            k: v
            for k, v in (("temperature", self.temperature), ("top_p", self.top_p))
            if v is not None
        }


# Body fields a client may never send, whatever models.yaml allows: each hands the client
# code execution, deserialisation or an internal of the worker (public CVEs exist in each
# class), or a value the gateway owns (`cache_salt`: a client must not choose its own
# prefix-cache domain).
NEVER_FORWARDED = frozenset(
    {
        "cache_salt",
        "chat_template",
        "prompt_embeds",
        "logits_processors",
        "kv_transfer_params",
        "api_base",
        "base_url",
        "api_key",
    }
)
_FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class RequestFieldsSpec(_Strict):
    """Which body fields reach the worker beyond OpenAI's own (gateway.allowlist).

    `allow_extra`: engine extensions turned on for this model (vLLM's `top_k`, `min_p`,
    `repetition_penalty`, `guided_json`, ...). `unknown`: what happens to any other field
    a client sends — `reject` (400 naming it) or `drop` (removed, the request goes on)."""

    allow_extra: list[Annotated[str, Field(pattern=_FIELD_NAME)]] = Field(default_factory=list)
    unknown: Literal["reject", "drop"] = "reject"

    @model_validator(mode="after")
    def _allowed(self) -> RequestFieldsSpec:
        for i, name in enumerate(self.allow_extra):
            if name in NEVER_FORWARDED:
                raise ValueError(
                    f"allow_extra[{i}]: `{name}` is never forwarded (the gateway owns it or "
                    "it lets a client reach into the worker)"
                )
            if self.allow_extra.index(name) != i:
                raise ValueError(f"allow_extra[{i}]: `{name}` is listed twice")
        return self


_HOST = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}$"


class MediaSpec(_Strict):
    """Image / audio / video / file parts of chat messages (gateway.media).

    `accept`: `none` refuses every media part (the default: a text model has no use for
    them); `data` accepts only inline `data:` URLs; `https` also accepts https URLs to
    the listed `hosts` (exact names, or `*.example.com` for its subdomains). Every URL is
    checked after parsing; a host resolving to a loopback, link-local, private or other
    non-public address is refused unless `allow_private`. `max_data_bytes` caps each
    decoded `data:` payload."""

    accept: Literal["none", "data", "https"] = "none"
    hosts: list[Annotated[str, Field(pattern=_HOST, max_length=253)]] = Field(default_factory=list)
    allow_private: bool = False
    max_data_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    @model_validator(mode="after")
    def _hosts_fit(self) -> MediaSpec:
        if self.accept == "https" and not self.hosts:
            raise ValueError("hosts: accept https needs the hosts media may be fetched from")
        if self.accept != "https" and self.hosts:
            raise ValueError("hosts: only used with accept: https")
        return self


_ZMQ_ADDR = r"^(tcp://[^\s]+:[0-9]{1,5}|ipc://[^\s]+)$"


class KVEventSourceSpec(_Strict):
    """Where one attached worker publishes its KV-cache events (vLLM's `--kv-events-config`
    `endpoint` / `replay_endpoint` / `topic`, as the gateway reaches them)."""

    endpoint: str = Field(pattern=_ZMQ_ADDR)
    replay: str | None = Field(default=None, pattern=_ZMQ_ADDR)
    topic: str = Field(default="", max_length=256)


class KVEventsSpec(_Strict):
    """The `kv_cache_hit` scorer's settings (`engines.upstream.routing.kv_cache_hit`)."""

    # How the gateway tokenizes a prompt the way the worker will: `hf` (the model's
    # tokenizer and chat template) or `words` (the simulator's tokens); default: the
    # engine's (`words` for sim, else `hf`).
    tokenizer: Literal["hf", "words"] | None = None
    # Where `hf` reads the tokenizer (default: the model's path).
    tokenizer_path: str | None = None
    # Attach mode: each endpoint's event source, keyed by the endpoint's URL as listed in
    # `endpoints`. Launched workers (vllm, sim) get theirs from the engine.
    sources: dict[str, KVEventSourceSpec] = Field(default_factory=dict)
    # Launched vLLM workers: replica i publishes on base_port + 2i, replays on + 2i + 1.
    base_port: int = Field(default=5557, ge=1024, le=65000)
    # Blocks the index keeps per worker before it clears that worker (memory bound).
    max_blocks: int = Field(default=1 << 19, ge=1024, le=1 << 24)
    # Prompts longer than this many characters are tokenized in a thread.
    thread_above_chars: int = Field(default=2048, ge=0)


class RoutingSpec(_Strict):
    """How a request picks one of the model's workers (`engines.upstream.routing`):
    scorer name → weight, and what the affinity scorers key on. The default is fewest
    outstanding requests among healthy workers, ties round-robin."""

    scorers: dict[str, float] = Field(default_factory=lambda: {"least_outstanding": 1.0})
    # Ties between equal weighted scores: "round_robin" (a rotating scan start) or "random".
    ties: Literal["round_robin", "random"] = "round_robin"
    # prefix_affinity: the prompt's first `prefix_chars` characters are its key.
    prefix_chars: int = Field(default=512, ge=16, le=65536)
    # prefix_affinity / session_affinity: consistent hashing with bounded load — a key's
    # worker is skipped while it has more than `load_factor` × the mean outstanding, or
    # more than `load_factor` × the recent requests of the least busy worker
    # (`engines.upstream.routing.hashring`).
    load_factor: float = Field(default=1.25, ge=1.0, le=10.0)
    # session_affinity: the request header that names the session (the body's `user` field
    # is the fallback).
    session_header: str = Field(default="x-session-id", pattern=r"^[A-Za-z0-9-]+$")
    # kv_cache_hit: the tokenizer and the workers' event sources.
    kv_events: KVEventsSpec = Field(default_factory=KVEventsSpec)

    @field_validator("scorers")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("name at least one scorer")
        for name, w in v.items():
            if not 0 <= w <= 100:
                raise ValueError(f"{name}: weight must be between 0 and 100")
        if not any(v.values()):
            raise ValueError("at least one weight must be > 0")
        return v


class AdmissionSpec(_Strict):
    """At most `max_concurrent` requests of this model at the engine; up to `max_queue`
    more wait (first come, first served) for at most `queue_timeout_s`; beyond that a 503
    with Retry-After, never a hang."""

    max_concurrent: int = Field(ge=1, le=100_000)
    max_queue: int = Field(default=0, ge=0, le=1_000_000)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    retry_after_s: float = Field(default=1.0, ge=1)


class BatchingSpec(_Strict):
    max_sequences: int = Field(default=16, ge=1, le=4096)
    max_batched_tokens: int | None = Field(default=None, ge=16)


class ModelSpec(_Strict):
    """One entry of `models:` in models.yaml."""

    name: str = Field(min_length=1, max_length=256)
    # One of the registry's names (`engines.ENGINES`).
    engine: str
    # A local path, a hub id, or `pypi:PACKAGE==VERSION/path/inside/the/wheel` for models
    # shipped on PyPI (the default model). Unused by `openai`/`sim` attach-only engines.
    model: str | None = None
    task: Literal["generate", "embed"] = "generate"
    # The model name the upstream worker serves under, when it differs from `name`.
    served_model_name: str | None = None
    max_model_len: int = Field(default=2048, ge=16)
    # max_tokens when a request gives none. Set here, the gateway applies it to every
    # engine; left out, each engine's own default holds (embedded: this value, 256; vLLM:
    # the rest of the context).
    max_tokens_default: int = Field(default=256, ge=1)
    request_defaults: RequestDefaults = Field(default_factory=RequestDefaults)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Quantization = "none"
    speculative: SpeculativeSpec | None = None
    lora: LoraSpec | None = None
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    # What of a request body reaches the worker, and which media parts may (gateway-side).
    request_fields: RequestFieldsSpec = Field(default_factory=RequestFieldsSpec)
    media: MediaSpec = Field(default_factory=MediaSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    # The gateway's bounded admission queue for this model (`gateway.admission`); none
    # when left out.
    admission: AdmissionSpec | None = None
    # Launch mode: how many worker processes; attach mode: the worker base URLs.
    replicas: int = Field(default=1, ge=1, le=64)
    endpoints: list[str] = Field(default_factory=list)
    gpus_per_replica: int = Field(default=1, ge=0, le=16)
    # Environment variable holding the upstream API key (attach mode).
    api_key_env: str | None = None
    # Engine-specific knobs (LMDeploy backend, sim latencies, ...): typed by each engine.
    options: dict[str, Any] = Field(default_factory=dict)
    # Raw extra flags passed through to the engine's launcher, e.g. {"enforce-eager": true}.
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _valid_name(v, 256)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ENGINES:
            raise ValueError(f"must be one of {', '.join(ENGINES)}; got {v!r}")
        return v

    @model_validator(mode="after")
    def _general(self) -> ModelSpec:
        if self.endpoints and self.replicas != 1:
            raise ValueError("replicas: give either endpoints (attach) or replicas (launch)")
        for i, url in enumerate(self.endpoints):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoints[{i}]: must be an http(s) URL, got {url!r}")
        if self.max_tokens_default > self.max_model_len:
            raise ValueError("max_tokens_default: must be ≤ max_model_len")
        if self.task == "embed" and (self.speculative or self.lora):
            raise ValueError("task: an embedding model takes no speculative or lora section")
        return self

    @property
    def upstream_name(self) -> str:
        return self.served_model_name or self.name

    @property
    def attach(self) -> bool:
        return bool(self.endpoints)


class SpecIssue(BaseModel):
    """An engine's objection to a spec: `path` is relative to the model entry."""

    path: str
    message: str
