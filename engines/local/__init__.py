"""The embedded `transformers` engine, one concern per module.

  engine.py   the `Engine` implementation (lifecycle, requests, adapters)
  prompts.py  request → prompt token ids and per-choice sampling parameters
  shapes.py   OpenAI response shapes: ids, usage objects, bodies, SSE chunks, logprobs,
              tool_calls
  structured.py  response_format / tools → a grammar (llguidance), refused fields
  batcher.py  the continuous-batching decode loop over one in-process model (torch)
  kvcache.py  KV cache layers that grow in place (torch)
  text.py     incremental detokenisation and stop strings
  embed.py    sentence embeddings for `task: embed` (torch)

Importing this package imports neither torch nor transformers (`gateway check` imports
engine classes only to call `check_spec`); batcher.py and embed.py are imported when a
model starts.
"""

from engines.local.engine import LocalEngine

__all__ = ["LocalEngine"]
