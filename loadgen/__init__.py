"""The load generator behind `gateway bench`, and its Python API for `bench/overhead.py`.

Owns measuring any OpenAI-compatible base URL the way LLM serving is measured (TTFT,
TPOT, ITL, E2E latency with `vllm bench serve`'s definitions; request and token
throughput; errors by type). Modules: runner (the async load loop and HTTP/SSE client),
metrics (records and statistics), report (table and JSON), plots (PNG), cli (the
sub-command).

Does not own: starting servers or comparing targets (that is `bench/overhead.py`), and it
imports nothing else from the gateway: it must measure any server, ours included, from
the outside.
"""

from loadgen.metrics import RequestRecord, Stats, summarize
from loadgen.runner import LoadConfig, Result, open_session, run_load

__all__ = [
    "LoadConfig",
    "RequestRecord",
    "Result",
    "Stats",
    "open_session",
    "run_load",
    "summarize",
]
