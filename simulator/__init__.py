"""The vLLM-compatible simulator: a test and benchmark instrument, labelled as such.

It deliberately owns no real model, tokenizer or sampling: output tokens cycle through a
word list, prompt tokens are whitespace-separated words, and every response says it came
from the simulator (`system_fingerprint: "gateway-sim"`, header `server: gateway-sim`,
`owned_by: "gateway-sim"` in `/v1/models`).

Wire behaviour follows vLLM's OpenAI server: `/v1/chat/completions` and `/v1/completions`
(streamed as SSE ending in `data: [DONE]`, `stream_options.include_usage`, `n`,
`max_tokens` / `max_completion_tokens`), `/v1/embeddings` (deterministic pseudo-vectors,
float or base64), `/v1/models`, `/health`, `/metrics` (`vllm:*` names), and the runtime
LoRA API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) with vLLM's bodies, messages
and statuses, and `/tokenize` / `/detokenize` (a token is a word the usage counts). Errors
use vLLM's envelope `{"error": {"message","type","param","code"}}` (or the older flat
`{"object": "error", ...}` with `legacy_errors`).

    config.py      SimConfig: latency, capacity and fault knobs, and their flags
    state.py       SimState: counters, capacity queue, draws, /metrics, /v1/models
    server.py      SimServer: the listening socket around a SimState
    connection.py  one connection: HTTP/1.1 parsing, dispatch, pacing, faults
    behaviour.py   what a request answers: generation shapes, embeddings, LoRA API
    tokens.py      the word tokenizer (behind /tokenize, /detokenize)
    wire.py        status lines, stream framing, vLLM's error shape
    __main__.py    `python -m simulator` (also `gateway sim`)

Nothing here imports the gateway or the engines.
"""

from simulator.config import SimConfig
from simulator.server import SimServer

__all__ = ["SimConfig", "SimServer"]
