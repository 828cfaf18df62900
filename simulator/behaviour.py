"""What the simulator answers: generation (chunks, whole bodies, usage), embeddings and the
runtime LoRA API, with vLLM's messages and statuses.

Owns request parsing into a `Gen`, the byte templates of every response and the token
accounting. Does not own the connection, timing or faults (`simulator.connection` runs a
`Gen` on the clock and injects faults) nor the server's counters' exposition
(`simulator.server`).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from simulator.config import FINGERPRINT
from simulator.costs import prompt_words, token_ids
from simulator.tokens import MAX_ID, counted_words
from simulator.wire import HttpError, count_words

if TYPE_CHECKING:
    from simulator.state import SimState


@dataclass(slots=True)
class Gen:
    """One parsed generation request."""

    chat: bool
    stream: bool
    model: str
    n: int
    n_out: int
    prompt_tokens: int
    include_usage: bool
    finish: bytes  # JSON of the last chunk's finish_reason (+ stop_reason)
    # Where in the word cycle the output starts: 0 for a fresh answer, k when the prompt
    # (or chat's continued final assistant message) ends with the first k output tokens.
    start: int = 0
    # Prefill time of the uncached prompt tokens (cost model), in seconds.
    prefill_s: float = 0.0


# ------------------------------------------- LoRA runtime API (vLLM's messages and statuses)


def load_lora(s: SimState, body: bytes) -> bytes:
    req = json_body(body)
    name, path = req.get("lora_name"), req.get("lora_path")
    if not name or not path:
        raise HttpError(
            400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
        )
    if name in s.adapters:
        raise HttpError(
            400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
        )
    if s.config.max_loras and len(s.adapters) >= s.config.max_loras:
        raise HttpError(
            400,
            f"Cannot load LoRA adapter '{name}': {len(s.adapters)} loaded, max_loras is "
            f"{s.config.max_loras}.",
            "InvalidUserInput",
        )
    s.adapters[str(name)] = str(path)
    s.adapter_loads += 1
    return f"Success: LoRA adapter '{name}' added successfully.".encode()


def unload_lora(s: SimState, body: bytes) -> bytes:
    req = json_body(body)
    name = req.get("lora_name")
    if not name:
        raise HttpError(
            400,
            "'lora_name' needs to be provided to unload a LoRA adapter.",
            "InvalidUserInput",
        )
    if name not in s.adapters:
        raise HttpError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    del s.adapters[name]
    return f"Success: LoRA adapter '{name}' removed successfully.".encode()


# -------------------------------------------------------------------------------- embeddings


def embeddings(s: SimState, body: bytes, req_id: bytes | None) -> bytes:
    req = json_body(body)
    model = check_model(s, req)
    inputs = req.get("input")
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
    ):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise HttpError(400, "'input' must be a string or a non-empty list.")
    b64 = req.get("encoding_format") == "base64"
    dim = s.config.embedding_dim
    data, prompt = [], 0
    for i, item in enumerate(inputs):
        prompt += count_words(item)
        seed = hashlib.blake2b(orjson.dumps(item), digest_size=8).digest()
        rng = random.Random(seed)
        vec = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        vec = [v / norm for v in vec]
        emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    s.prompt_tokens_total += prompt
    return orjson.dumps(
        {
            "id": "embd-" + s.new_id(req_id).decode(),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0},
        }
    )


# -------------------------------------------------------------------------------- generation


def json_body(body: bytes) -> dict[str, Any]:
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HttpError(400, "The request body is not valid JSON.") from None
    if not isinstance(req, dict):
        raise HttpError(400, "The request body must be a JSON object.")
    return req


def check_model(s: SimState, req: dict[str, Any]) -> str:
    model = req.get("model") or s.config.model
    if model != s.config.model and model not in s.adapters:
        raise HttpError(404, f"The model `{model}` does not exist.", "NotFoundError")
    return str(model)


def parse_gen(s: SimState, chat: bool, body: bytes) -> Gen:
    c = s.config
    req = json_body(body)
    model = check_model(s, req)
    start = 0
    if chat:
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list.")
        prompt_tokens = count_words(messages)
        if req.get("continue_final_message") is True:
            last = messages[-1]
            if isinstance(last, dict) and last.get("role") == "assistant":
                content = last.get("content")
                if isinstance(content, str):
                    start = s.continued_from(content)
    else:
        if "prompt" not in req:
            raise HttpError(400, "'prompt' is required.")
        prompt = req["prompt"]
        prompt_tokens = count_words(prompt)
        if isinstance(prompt, str):
            start = s.continued_from(prompt)
    prompt_tokens = max(1, prompt_tokens)
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    if max_tokens is None:
        # A greedy model stops where its uninterrupted answer would have stopped.
        n_out, finish = max(1, c.output_tokens - start), b'"stop","stop_reason":null'
    else:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise HttpError(400, f"max_tokens must be at least 1, got {max_tokens!r}.")
        n_out, finish = max_tokens, b'"length","stop_reason":null'
    if prompt_tokens + n_out > c.max_model_len:
        raise HttpError(
            400,
            f"This model's maximum context length is {c.max_model_len} tokens. However, "
            f"you requested {prompt_tokens + n_out} tokens ({prompt_tokens} in the "
            f"messages, {n_out} in the completion). Please reduce the length of the "
            "messages or completion.",
        )
    n = req.get("n") or 1
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise HttpError(400, "n must be between 1 and 128.")
    opts = req.get("stream_options")
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    g = Gen(
        chat, bool(req.get("stream")), model, n, n_out, prompt_tokens, include_usage, finish, start
    )
    cache = s.prefix_cache
    if c.prefill_ms_per_token or cache is not None:
        words = prompt_words(req.get("messages") if chat else req.get("prompt"))
        cached = 0
        if cache is not None:
            # Keyed as vLLM keys blocks: the adapter's name and the tenant's cache_salt.
            salt = req.get("cache_salt")
            cached = cache.lookup_insert(
                token_ids(words),
                model if model != c.model else None,
                salt if isinstance(salt, str) and salt else None,
            )
        g.prefill_s = c.prefill_ms_per_token * max(0, len(words) - cached) / 1000
    return g


def templates(s: SimState, g: Gen, rid: bytes) -> tuple[bytes, bytes]:
    """(head of every chunk up to `"choices":[`, JSON id) for this request."""
    created = b"%d" % int(time.time())
    if g.chat:
        full_id, obj = b"chatcmpl-" + rid, b"chat.completion.chunk"
    else:
        full_id, obj = b"cmpl-" + rid, b"text_completion"
    head = (
        b'data: {"id":"'
        + full_id
        + b'","object":"'
        + obj
        + b'","created":'
        + created
        + b',"model":'
        + s.mjson(g.model)
        + b',"system_fingerprint":"gateway-sim","choices":['
    )
    return head, full_id


def token_events(s: SimState, g: Gen, head: bytes, step: int, first: bool, count: int = 1) -> bytes:
    """The SSE events of output tokens `step` .. `step + count - 1` for every choice (one
    delta of `count` tokens per choice)."""
    toks = s.tok_json
    w = len(toks)
    fin = g.finish if step + count == g.n_out else b"null"
    parts = []
    for i in range(g.n):
        if count == 1:
            tok = toks[(i + g.start + step) % w]
        else:
            tok = orjson.dumps(s.text((i + g.start + step) % w, count))
        if g.chat:
            if first:
                parts.append(
                    head + b'{"index":%d,"delta":{"role":"assistant","content":""},'
                    b'"logprobs":null,"finish_reason":null}]}\n\n' % i
                )
            parts.append(
                head + b'{"index":%d,"delta":{"content":%s},"logprobs":null,'
                b'"finish_reason":%s}]}\n\n' % (i, tok, fin)
            )
        else:
            parts.append(
                head
                + b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}]}\n\n' % (i, tok, fin)
            )
    return b"".join(parts)


def usage_event(g: Gen, head: bytes) -> bytes:
    c = g.n_out * g.n
    usage = b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
    return head + usage % (g.prompt_tokens, g.prompt_tokens + c, c)


def whole_body(s: SimState, g: Gen, full_id: bytes) -> bytes:
    finish = "length" if g.finish.startswith(b'"length"') else "stop"
    choices: list[dict[str, Any]] = []
    for i in range(g.n):
        text = s.text((i + g.start) % len(s.tok_json), g.n_out)
        if g.chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            )
        else:
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            )
    c = g.n_out * g.n
    return orjson.dumps(
        {
            "id": full_id.decode(),
            "object": "chat.completion" if g.chat else "text_completion",
            "created": int(time.time()),
            "model": g.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": g.prompt_tokens,
                "total_tokens": g.prompt_tokens + c,
                "completion_tokens": c,
            },
            "system_fingerprint": FINGERPRINT,
        }
    )


def account(s: SimState, g: Gen) -> None:
    s.generation_tokens_total += g.n_out * g.n
    s.requests_total += 1
    s.count_spec(g.n_out * g.n)


# --------------------------------------------------------------------- /tokenize


def _flag(req: dict[str, Any], name: str, default: bool) -> bool:
    value = req.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HttpError(400, f"'{name}' must be a boolean.")
    return value


def tokenize(s: SimState, body: bytes) -> bytes:
    req = json_body(body)
    check_model(s, req)
    if "messages" in req:
        messages = req["messages"]
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "'messages' must be a non-empty list.")
        # vLLM refuses the two together (only when both are sent as true).
        if _flag(req, "continue_final_message", False) and req.get("add_generation_prompt"):
            raise HttpError(
                400,
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            )
        _flag(req, "add_generation_prompt", True)
        _flag(req, "add_special_tokens", False)
        words = counted_words(messages)
    elif "prompt" in req:
        if not isinstance(req["prompt"], str):
            raise HttpError(400, "'prompt' must be a string.")
        _flag(req, "add_special_tokens", True)
        words = counted_words(req["prompt"])
    else:
        raise HttpError(400, "Either 'prompt' or 'messages' is required.")
    tokens = s.vocab.ids(words)
    strs = (words or [""]) if _flag(req, "return_token_strs", False) else None
    return orjson.dumps(
        {
            "count": len(tokens),
            "max_model_len": s.config.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }
    )


def detokenize(s: SimState, body: bytes) -> bytes:
    req = json_body(body)
    check_model(s, req)
    tokens = req.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_ID for t in tokens
    ):
        raise HttpError(400, "'tokens' must be a list of token ids (integers from 0).")
    words = []
    for t in tokens:
        w = s.vocab.word(t)
        if w is None:
            raise HttpError(400, f"Token id {t} is out of vocabulary.")
        if w:
            words.append(w)
    return orjson.dumps({"prompt": " ".join(words)})
