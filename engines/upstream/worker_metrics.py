"""Workers' own load figures, engine by engine, read into one engine-neutral `WorkerStatus`.

Owns the table of metric families the gateway understands and how each maps onto the
normalised load that routing scorers read (`Endpoint.load`: running, waiting, KV-cache use
0..1, speculative-decoding counters). The family is told per worker from the names its
`/metrics` exposes, so one model's pool may mix vLLM and LMDeploy workers and the
`queue_depth` / `kv_cache` scorers compare like with like. Does not scrape (the health
loop, `engines.upstream.health`) or score (`engines.upstream.routing`).

Names: vLLM 0.26 (vllm/v1/metrics/loggers.py), LMDeploy 0.18 (lmdeploy/metrics/loggers.py).

    figure          vLLM                              LMDeploy
    running         vllm:num_requests_running         lmdeploy:num_requests_running
    waiting         vllm:num_requests_waiting         lmdeploy:num_requests_waiting
                                                      + lmdeploy:num_api_requests_waiting
                                                        (queued at its API server)
    KV-cache use    vllm:kv_cache_usage_perc (0..1;   lmdeploy:gpu_cache_usage_perc (0..1)
                    older: vllm:gpu_cache_usage_perc)
    spec. accepted  <family>spec_decode_num_accepted_tokens_total
    spec. drafted   <family>spec_decode_num_draft_tokens_total
"""

from __future__ import annotations

from engines.base import WorkerStatus

__all__ = ["FAMILIES", "family_of", "read_load"]

# Every prefix scraped from a worker's /metrics (the rest of its exposition is skipped).
FAMILIES: tuple[str, ...] = ("vllm:", "lmdeploy:")


def family_of(m: dict[str, float]) -> str:
    """The family of a worker's scraped sums: LMDeploy when it names its running gauge,
    else vLLM (the default, also for a worker that exposes neither)."""
    return "lmdeploy:" if "lmdeploy:num_requests_running" in m else "vllm:"


def read_load(m: dict[str, float], w: WorkerStatus) -> None:
    """Fill `w`'s load figures from one worker's scraped sums, whatever its engine."""
    p = family_of(m)
    running, waiting = m.get(p + "num_requests_running"), m.get(p + "num_requests_waiting")
    if p == "lmdeploy:":
        api_waiting = m.get("lmdeploy:num_api_requests_waiting")
        if api_waiting is not None:
            waiting = (waiting or 0.0) + api_waiting
    w.running = None if running is None else int(running)
    w.waiting = None if waiting is None else int(waiting)
    kv = m.get(p + "kv_cache_usage_perc")
    w.kv_cache_usage = kv if kv is not None else m.get(p + "gpu_cache_usage_perc")
    w.spec_accepted_tokens = m.get(p + "spec_decode_num_accepted_tokens_total")
    w.spec_draft_tokens = m.get(p + "spec_decode_num_draft_tokens_total")
