"""The Responses API's request on the wire: a pydantic model with OpenAI's field names
(openai SDK 3.63, `openai/types/responses/response_create_params.py`), its scalar bounds,
and the fields this gateway refuses because it cannot honour them.

Input items, tools and `tool_choice` stay plain JSON here and are checked one by one in
`gateway.responses.translate`, so each refusal names its exact place (`input[2].call_id`).
No engine imports beyond the error tree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.allowlist import RESPONSES_FIELDS
from gateway.protocol import Temperature, TopP

__all__ = ["REFUSED", "RESPONSES_FIELDS", "ResponsesRequest", "TextConfig", "TextFormat"]

# Fields a gateway in front of chat-completions engines cannot honour: a value other than
# these defaults is a 400 naming the field, never silently ignored.
REFUSED: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "context_management": (None,),
    "top_logprobs": (None, 0),
}


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Loose):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Loose):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = True
    stream: bool | None = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    include: list[str] | None = None
