"""How the process runs: every `GATEWAY_*` environment variable, typed, in one place.

What is served lives in models.yaml (`gateway.catalog`); this module owns only process
settings and request bounds, and turning a bad value into one line per variable that
names it and says what is allowed (`load_settings`, `SettingsError`). The app receives
one `Settings` instance from its creator; nothing reads the environment elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "GATEWAY_"
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _default_cache() -> Path:
    return Path.home() / ".cache" / "llm-gateway"


def _otel(field: str, default: Any, *names: str) -> Any:
    """A field read from OpenTelemetry's own variables `names` (the first set wins), not
    GATEWAY_*; still settable by its field name in code."""
    return Field(default=default, validation_alias=AliasChoices(*names, field))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    config: Path = Path("models.yaml")
    cache_dir: Path = Field(default_factory=_default_cache)
    log_level: LogLevel = "info"
    # Comma-separated client API keys; empty means no key is required.
    api_keys: str = ""
    # Key for the admin routes (adapter load/unload); empty means they are disabled.
    admin_key: str = ""
    # When set, the admin routes (/admin/*, /v1/load_lora_adapter, /v1/unload_lora_adapter)
    # are served only on this port, bound to admin_host, and answer 404 on the public port
    # (the admin key is still required). Unset: they share the public port.
    admin_port: int | None = Field(default=None, ge=1, le=65535)
    admin_host: str = "127.0.0.1"
    # /health/ready: "any" model ready, "all" of them, or a comma-separated list of names.
    ready_when: str = "any"
    # A model that fails to start is retried after this many seconds, doubling to 300.
    start_retry_s: float = Field(default=5.0, gt=0)
    # On SIGTERM: readiness goes 503 at once, the listener keeps accepting for
    # drain_accept_s (a load balancer notices), then in-flight requests get up to
    # drain_seconds (below) to finish (`gateway.drain`).
    drain_accept_s: float = Field(default=5.0, ge=0)
    # Hashed API keys with per-key limits (gateway.keys): a JSON keys file for one box;
    # with GATEWAY_REDIS_URL set, keys, limits and usage live in Redis instead.
    keys_file: Path | None = None
    redis_url: str = ""
    redis_prefix: str = "gw"
    # Every hot-path Redis call's timeout.
    redis_timeout_ms: float = Field(default=50.0, gt=0, le=1000)
    # When Redis does not answer: "closed" answers 503; "local" decides in this process
    # at each limit ÷ redis_local_share (default: the number of front-door processes).
    redis_outage: Literal["closed", "local"] = "closed"
    redis_local_share: int = Field(default=0, ge=0)
    # Managed Redis (gateway.state_store.target): an ACL user (wins over the URL's), TLS
    # for rediss:// (CA bundle, client certificate), Sentinel ("host:port,..." and the
    # monitored service's name; the URL then gives scheme, user, password and db only).
    redis_username: str = ""
    redis_password: str = ""
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    redis_tls_check_hostname: bool = True
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str = ""
    # Front-door processes of `gateway serve` (gateway.workers).
    workers: int = Field(default=1, ge=1, le=64)
    # Each front door listens on its own SO_REUSEPORT socket, so the kernel spreads
    # connections evenly (gateway.server_limits.reuse_port_socket); false: one shared
    # socket, whose pending connections survive a front door's death.
    reuse_port: bool = True
    # Stored responses of /v1/responses (gateway.responses.store), per API key: kept this
    # long (OpenAI keeps them 30 days), and at most this many bytes per key, the oldest
    # evicted first. In this process's memory, or in Redis when GATEWAY_REDIS_URL is set.
    responses_ttl_s: int = Field(default=30 * 24 * 3600, ge=1)
    responses_max_bytes_per_key: int = Field(default=64 * 1024 * 1024, ge=1024)

    # Request bounds, checked before anything reaches an engine.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_n: int = Field(default=16, ge=1)
    max_prompts: int = Field(default=64, ge=1)
    # Prompts × n of one completions request: what one request may add to a batch.
    max_sequences_per_request: int = Field(default=256, ge=1)
    max_stop_sequences: int = Field(default=16, ge=1)
    max_stop_length: int = Field(default=256, ge=1)
    max_embedding_inputs: int = Field(default=2048, ge=1)
    # Lists and maps of a request (gateway.bounds); each refusal is a 400 naming the field.
    max_messages: int = Field(default=2048, ge=1)
    max_message_chars: int = Field(default=1_000_000, ge=1)  # all messages' text together
    max_content_parts: int = Field(default=256, ge=1)  # all messages' parts together
    max_tools: int = Field(default=128, ge=1)  # OpenAI's limit
    max_tools_bytes: int = Field(default=256 * 1024, ge=1024)  # tools / functions as JSON
    max_schema_depth: int = Field(default=32, ge=2)  # tool / response_format / extension JSON
    max_logit_bias: int = Field(default=300, ge=1)
    max_metadata_pairs: int = Field(default=16, ge=1)  # OpenAI: 16 pairs, keys 64, values 512
    max_metadata_key_chars: int = Field(default=64, ge=1)
    max_metadata_value_chars: int = Field(default=512, ge=1)

    # Server limits (gateway.server_limits): reading clients, not serving them.
    header_timeout_s: float = Field(default=10.0, gt=0)  # first byte → end of headers
    body_gap_timeout_s: float = Field(default=10.0, gt=0)  # between body chunks
    body_timeout_s: float = Field(default=60.0, gt=0)  # end of headers → end of body
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)  # request line + headers: 431
    max_connections: int = Field(default=4096, ge=1)  # all clients together
    # One client address; behind a proxy every client has the proxy's: raise it there.
    max_connections_per_client: int = Field(default=256, ge=1)
    keepalive_timeout_s: float = Field(default=5.0, gt=0)  # idle between requests

    # Operations: the access log (`gateway.access_log`) and CORS (`gateway.cors`).
    # One JSON line per request on the `gateway.access` logger; off with false.
    access_log: bool = True
    # The share of requests logged, 0..1 (failed requests are always logged).
    access_log_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    # Comma-separated; the defaults are vLLM's server's (`--allowed-origins` etc.): any.
    cors_origins: str = "*"
    cors_methods: str = "*"
    cors_headers: str = "*"
    cors_allow_credentials: bool = False
    # On SIGTERM, how long requests in flight (long streams) may take to finish.
    drain_seconds: int = Field(default=30, ge=0)
    # Traces (`gateway.tracing`), off unless an endpoint is set: OTLP/HTTP (protobuf) to
    # this collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT: /v1/traces is appended).
    otlp_endpoint: str = ""
    # The share of requests traced when the client sent no `traceparent`, 0..1 (with one,
    # its sampled flag decides, as OpenTelemetry's parent-based sampler).
    trace_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    # OpenTelemetry's standard variables, read under their own names: the traces URL as
    # is, the base URL (+ /v1/traces), headers (`k=v,k2=v2`), gzip or none, the export
    # timeout (ms), the service name and resource attributes; OTEL_SDK_DISABLED=true
    # turns tracing off.
    otel_traces_endpoint: str = _otel(
        "otel_traces_endpoint", "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    otel_endpoint: str = _otel("otel_endpoint", "", "OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_headers: str = _otel(
        "otel_headers", "", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"
    )
    otel_compression: Literal["none", "gzip"] = _otel(
        "otel_compression",
        "none",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    )
    otel_timeout_ms: float = _otel(
        "otel_timeout_ms",
        10_000.0,
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    )
    otel_service_name: str = _otel("otel_service_name", "llm-gateway", "OTEL_SERVICE_NAME")
    otel_resource_attributes: str = _otel(
        "otel_resource_attributes", "", "OTEL_RESOURCE_ATTRIBUTES"
    )
    otel_sdk_disabled: bool = _otel("otel_sdk_disabled", False, "OTEL_SDK_DISABLED")

    @model_validator(mode="after")
    def _sentinels_need_a_url(self) -> Settings:
        # Without a URL the gateway would quietly keep its state in memory.
        if self.redis_sentinels and not self.redis_url:
            raise ValueError(
                "GATEWAY_REDIS_SENTINELS is set: set GATEWAY_REDIS_URL too (its scheme, "
                "user, password and database are used; e.g. redis://mymaster/0)"
            )
        if self.redis_url:  # TLS without rediss://, a certificate without its key, ...
            from gateway.state_store.target import RedisTarget

            RedisTarget.from_settings(self)
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @property
    def client_keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())


class SettingsError(Exception):
    """Bad `GATEWAY_*` values: `lines` holds one line per variable."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _allowed(name: str) -> str:
    """What a field accepts, in words, from its type and bounds."""
    field = Settings.model_fields[name]
    ann = field.annotation
    choices = get_args(ann) if getattr(ann, "__origin__", None) is Literal else ()
    if choices:
        return "one of " + ", ".join(str(c) for c in choices)
    kind = {int: "an integer", float: "a number", bool: "true or false", Path: "a path"}.get(
        ann,  # type: ignore[arg-type]
        "a string",
    )
    lo = hi = None
    for m in field.metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    if lo is not None:
        return f"{kind} >= {lo}"
    return kind


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and `overrides`); `SettingsError` when invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        lines, seen = [], set()
        for err in e.errors():
            if not err["loc"]:  # a check across variables: its own message names them
                lines.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            if name in seen or name not in Settings.model_fields:
                continue
            seen.add(name)
            var = ENV_PREFIX + name.upper()
            given = err.get("input")
            lines.append(f"{var}={given!r} is not allowed: {var} must be {_allowed(name)}.")
        raise SettingsError(lines or [str(e)]) from None
