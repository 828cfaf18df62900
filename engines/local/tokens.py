"""vLLM's `POST /tokenize` and `POST /detokenize` with the embedded model's tokenizer.

Owns reading the two request shapes (vLLM's `vllm/entrypoints/serve/tokenize/protocol.py`)
and answering them with a Hugging Face tokenizer: a `prompt` string is tokenized as given
(`add_special_tokens` default true); chat `messages` go through the model's chat template
first, exactly as a chat request's prompt is built (`add_generation_prompt` default true,
`continue_final_message`, `tools`; `add_special_tokens` default false, since the template
writes them), so `count` is what a chat request of those messages is billed as prompt
tokens. Does not own the engine (`engines.local.engine` calls these) nor any HTTP.
"""

from __future__ import annotations

from typing import Any

from engines.base import InvalidRequest

__all__ = ["detokenize", "tokenize"]


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean.", param=name)
    return value


def _flatten(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(
                f"'messages[{i}]' must be an object with a role.", param=f"messages[{i}]"
            )
        content = m.get("content")
        if isinstance(content, list):  # text parts only, as a chat prompt is built
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest(
                        "only text content parts can be tokenized",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        out.append({**m, "content": content if content is not None else ""})
    return out


def tokenize(tok: Any, body: dict[str, Any], max_model_len: int) -> dict[str, Any]:
    """The answer to a /tokenize body."""
    strs = _flag(body, "return_token_strs", False)
    if "messages" in body:
        messages = _flatten(body["messages"])
        gen = _flag(body, "add_generation_prompt", True)
        cont = _flag(body, "continue_final_message", False)
        if gen and cont and body.get("add_generation_prompt") is True:
            raise InvalidRequest(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                param="continue_final_message",
            )
        kw: dict[str, Any] = {}
        if body.get("tools"):
            kw["tools"] = body["tools"]
        text = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=gen and not cont,
            continue_final_message=cont,
            **kw,
        )
        ids: list[int] = tok(text, add_special_tokens=_flag(body, "add_special_tokens", False))[
            "input_ids"
        ]
    elif "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise InvalidRequest("'prompt' must be a string.", param="prompt")
        ids = tok(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))["input_ids"]
    else:
        raise InvalidRequest("Either 'prompt' or 'messages' is required.", param="prompt")
    return {
        "count": len(ids),
        "max_model_len": max_model_len,
        "tokens": ids,
        "token_strs": tok.convert_ids_to_tokens(ids) if strs else None,
    }


def detokenize(tok: Any, body: dict[str, Any], vocab: int) -> dict[str, Any]:
    """The answer to a /detokenize body."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise InvalidRequest("'tokens' must be a list of token ids.", param="tokens")
    for t in tokens:
        if not 0 <= t < vocab:
            raise InvalidRequest(f"Token id {t} is out of vocabulary.", param="tokens")
    return {"prompt": tok.decode(tokens)}
