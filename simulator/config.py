"""What one simulator server does: `SimConfig`, its range checks and its command-line flags.

Owns the knobs (latency, capacity, fault injection) and their validation, shared by the
`python -m simulator` flags and the `engine: sim` options of models.yaml. Does not own any
behaviour: the server reads these values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

FINGERPRINT = "gateway-sim"

DEFAULT_WORDS: tuple[str, ...] = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "simulated",
    "tokens",
    "keep",
    "flowing",
    "at",
    "steady",
    "pace",
)


@dataclass(slots=True)
class SimConfig:
    """What one simulator server does. Every field is also a `--flag` of `serve_main` and
    an `options:` key of a models.yaml entry with `engine: sim`."""

    model: str = "sim-model"
    # Latency: time to first token and the gap between tokens, in milliseconds.
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    # Relative spread of every latency draw (0 = exact), and its distribution.
    jitter: float = 0.0
    jitter_dist: Literal["uniform", "lognormal"] = "uniform"
    # Sequences generating at once; more wait in a FIFO queue (0 = unlimited).
    max_running: int = 0
    # Output length when a request gives no max_tokens.
    output_tokens: int = 16
    # Tokens in one streamed delta (vLLM sends several under load, or with speculative
    # decoding); the last delta may carry fewer.
    tokens_per_chunk: int = 1
    words: tuple[str, ...] = DEFAULT_WORDS
    max_model_len: int = 2048
    embedding_dim: int = 64
    # KV-cache capacity in tokens: vllm:kv_cache_usage_perc = tokens held / this.
    kv_cache_tokens: int = 65536
    # Speculative decoding counters (0 = not configured): draft length and acceptance rate.
    spec_tokens: int = 0
    spec_acceptance: float = 0.7
    # Adapters loaded at start (vLLM's --lora-modules name=path).
    lora_modules: dict[str, str] = field(default_factory=dict)
    # Requests to /v1/* must carry `Authorization: Bearer <api_key>` (vLLM's --api-key).
    api_key: str | None = None
    legacy_errors: bool = False
    seed: int | None = 0
    # ---- fault injection (each applies to a request with probability *_rate)
    error_rate: float = 0.0
    error_status: int = 500
    # No bytes for stall_ms after `stall_after` chunks (0 = before the response headers).
    stall_ms: float = 0.0
    stall_after: int = 0
    stall_rate: float = 1.0
    # Close the connection after `drop_after` token chunks (0 = before the response headers;
    # chat's role chunk is sent with the first token and not counted).
    drop_after: int | None = None
    drop_rate: float = 1.0
    # /health answers 503 (and generation 503) for this long after start.
    startup_s: float = 0.0
    # ---- cost model (`simulator.costs`)
    # Per-worker prefix cache in tokens (0 = off) and the prefill cost of an uncached
    # prompt token: TTFT = ttft_ms + prefill_ms_per_token × uncached prompt tokens.
    prefix_cache_tokens: int = 0
    prefill_ms_per_token: float = 0.0
    # KV-cache events on vLLM's wire (`simulator.kv_events`): the PUB port (0 = any free
    # one; the replay socket then takes another free one, else this port + 1), None = off.
    # What they describe is the prefix cache above, so they need prefix_cache_tokens.
    kv_events_port: int | None = None
    # Fault: the share of event batches numbered and buffered but never sent (a subscriber
    # sees the gap and may replay it).
    kv_events_drop_rate: float = 0.0
    # Adapters one worker holds at once (0 = unlimited; a load beyond it is refused, as
    # vLLM's --max-loras), and how long a load takes.
    max_loras: int = 0
    lora_load_ms: float = 0.0
    # /health never answers (a wedged process, as under SIGSTOP, for the health probe).
    hang_health: bool = False
    # The names /metrics uses for load: "vllm" (vllm:num_requests_waiting, …) or
    # "lmdeploy" (LMDeploy 0.18's lmdeploy:num_requests_waiting, …), for mixed pools.
    metrics_family: str = "vllm"

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            key, msg = problems[0]
            raise ValueError(f"{key}: {msg}")


def config_problems(c: SimConfig) -> list[tuple[str, str]]:
    """(field, message) for every out-of-range value; shared by SimConfig and check_spec."""
    out: list[tuple[str, str]] = []
    for key in (
        "ttft_ms",
        "itl_ms",
        "jitter",
        "stall_ms",
        "startup_s",
        "prefill_ms_per_token",
        "lora_load_ms",
    ):
        if getattr(c, key) < 0:
            out.append((key, "must be ≥ 0"))
    for key in ("error_rate", "stall_rate", "drop_rate", "spec_acceptance", "kv_events_drop_rate"):
        if not 0.0 <= getattr(c, key) <= 1.0:
            out.append((key, "must be between 0 and 1"))
    for key in (
        "output_tokens",
        "embedding_dim",
        "kv_cache_tokens",
        "max_model_len",
        "tokens_per_chunk",
    ):
        if getattr(c, key) < 1:
            out.append((key, "must be ≥ 1"))
    for key in ("max_running", "spec_tokens", "stall_after", "prefix_cache_tokens", "max_loras"):
        if getattr(c, key) < 0:
            out.append((key, "must be ≥ 0"))
    if c.drop_after is not None and c.drop_after < 0:
        out.append(("drop_after", "must be ≥ 0"))
    if not 400 <= c.error_status <= 599:
        out.append(("error_status", "must be an HTTP error status (400-599)"))
    if c.kv_events_port is not None:
        if not 0 <= c.kv_events_port <= 65534:
            out.append(("kv_events_port", "must be a port (0 = any free one)"))
        if not c.prefix_cache_tokens:
            out.append(("kv_events_port", "needs prefix_cache_tokens (the cache they describe)"))
    if c.metrics_family not in ("vllm", "lmdeploy"):
        out.append(("metrics_family", "must be vllm or lmdeploy"))
    if c.jitter_dist not in ("uniform", "lognormal"):
        out.append(("jitter_dist", "must be uniform or lognormal"))
    if not c.words:
        out.append(("words", "must not be empty"))
    return out


_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "model": (str, "model name served"),
    "ttft_ms": (float, "time to first token (ms)"),
    "itl_ms": (float, "inter-token latency (ms)"),
    "jitter": (float, "relative spread of latencies, e.g. 0.2"),
    "jitter_dist": (str, "uniform | lognormal"),
    "max_running": (int, "max running sequences, more queue FIFO (0 = unlimited)"),
    "output_tokens": (int, "output tokens when a request gives no max_tokens"),
    "tokens_per_chunk": (int, "tokens in one streamed delta"),
    "max_model_len": (int, "context length"),
    "embedding_dim": (int, "embedding vector size"),
    "kv_cache_tokens": (int, "KV-cache capacity in tokens (for vllm:kv_cache_usage_perc)"),
    "spec_tokens": (int, "speculative draft length for spec-decode counters (0 = off)"),
    "spec_acceptance": (float, "speculative acceptance rate 0..1"),
    "api_key": (str, "require this bearer key on /v1/*"),
    "seed": (int, "random seed for jitter and fault draws"),
    "error_rate": (float, "fraction of requests answered with --error-status"),
    "error_status": (int, "status of injected errors"),
    "stall_ms": (float, "stall this long (no bytes)"),
    "stall_after": (int, "chunks before the stall (0 = before headers)"),
    "stall_rate": (float, "fraction of requests that stall"),
    "drop_after": (int, "drop the connection after this many chunks"),
    "drop_rate": (float, "fraction of requests dropped"),
    "startup_s": (float, "/health answers 503 for this long"),
    "prefix_cache_tokens": (int, "per-worker prefix cache size in tokens (0 = off)"),
    "prefill_ms_per_token": (float, "TTFT added per uncached prompt token (ms)"),
    "kv_events_port": (int, "publish KV-cache events on this ZMQ port (0 = any free one)"),
    "kv_events_drop_rate": (float, "fraction of KV-event batches never sent (replayable)"),
    "max_loras": (int, "adapters held at once (0 = unlimited)"),
    "lora_load_ms": (float, "time one adapter load takes (ms)"),
    "metrics_family": (str, "vllm | lmdeploy: the metric names /metrics exposes"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway sim",
        description="vLLM-compatible SIMULATOR for tests and benchmarks (no real model).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for key, (typ, help_) in _FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None, help=help_)
    p.add_argument("--words", default=None, help="comma-separated output words")
    p.add_argument("--legacy-errors", action="store_true", help="old flat vLLM error shape")
    p.add_argument(
        "--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters at start"
    )
    return p


def config_from_args(argv: list[str]) -> tuple[SimConfig, str, int]:
    args = _parser().parse_args(argv)
    kw: dict[str, Any] = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.words:
        kw["words"] = tuple(w for w in args.words.split(",") if w)
    if args.legacy_errors:
        kw["legacy_errors"] = True
    mods = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--lora-modules: expected NAME=PATH, got {item!r}")
        mods[name] = path
    kw["lora_modules"] = mods
    try:
        return SimConfig(**kw), args.host, args.port
    except ValueError as e:
        raise SystemExit(f"gateway sim: {e}") from None
