"""The prompt's leading text, the key of prefix-affine routing.

Owns reading the first `limit` characters of a chat request's messages (their text in
order, roles included, so two conversations that share a system prompt share a prefix) or
of a completions prompt (its first string, or its first token ids written out). Does not
hash or route.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prompt_prefix"]


def prompt_prefix(body: dict[str, Any], limit: int) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text, in order
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = f"{m.get('role', '')}:{content if isinstance(content, str) else ''}\n"
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        return "".join(parts)[:limit]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt[:limit]
    if isinstance(prompt, list):  # token ids
        return ",".join(str(t) for t in prompt[: limit // 4])
    return ""
