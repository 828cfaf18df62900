"""The `options:` every engine that relays to OpenAI-compatible workers accepts.

Owns timeouts, health-check knobs and request-id forwarding for the upstream hop. The
launched engines (`engines.launch`) and the simulator engine extend this model.
"""

from __future__ import annotations

from pydantic import Field

from engines.options import EngineOptions

__all__ = ["UpstreamOptions"]


class UpstreamOptions(EngineOptions):
    """Options of engine "openai" (and the base of vllm / lmdeploy / sim)."""

    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Longest silence while reading a response (streamed or not); a non-streamed answer of a
    # long generation arrives only at its end, so this is generous.
    read_timeout_s: float = Field(default=600.0, gt=0)
    health_interval_s: float = Field(default=5.0, gt=0)
    health_timeout_s: float = Field(default=3.0, gt=0)
    # How long `start()` waits for a first healthy endpoint.
    start_timeout_s: float = Field(default=60.0, gt=0)
    adapter_timeout_s: float = Field(default=120.0, gt=0)
    # GET this path to check a worker ("/v1/models" for upstreams without /health); any
    # status below 500 counts as alive.
    health_path: str = Field(default="/health", pattern=r"^/")
    # Send the gateway's request id as X-Request-Id (vLLM uses it as its request id).
    forward_request_id: bool = True
