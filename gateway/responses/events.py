"""An engine's chat-completion stream → the Responses API's event stream.

Owns `EventStream`: fed the engine's SSE blocks (`data: {chunk}` events, the chat chunk
format of `engines.base`), it yields the Responses events as SSE bytes, in OpenAI's order,
each with its `sequence_number`:

    response.created, response.in_progress,
    per text item: response.output_item.added, response.content_part.added,
                   response.output_text.delta …, response.output_text.done,
                   response.content_part.done, response.output_item.done
    per call item: response.output_item.added, response.function_call_arguments.delta …,
                   response.function_call_arguments.done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens cut it short)

and on a failure after the first event, `error` then `response.failed` (never a silent
end). Each chunk is parsed (this route is not the relay hot path: a Responses stream is
re-framed event by event anyway). Does not own sending (the route) nor the Response
object's fields (`gateway.responses.translate`).
"""

from __future__ import annotations

from typing import Any

import orjson

from engines.errors import ServingError
from gateway.responses.translate import (
    Turn,
    call_item,
    message_item,
    new_id,
    response_object,
    usage_of,
)

__all__ = ["EventStream"]


class _Call:
    __slots__ = ("arguments", "call_id", "id", "name", "output_index")

    def __init__(self, output_index: int, call_id: str, name: str):
        self.id = new_id("fc")
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.arguments = ""


class EventStream:
    """One Responses stream's state: output items so far, the open ones, usage."""

    def __init__(self, turn: Turn):
        self.turn = turn
        self.seq = 0
        self.output: list[dict[str, Any] | None] = []  # None: an item still open
        self.text_id: str | None = None  # the open message item
        self.text_index = -1
        self.text = ""
        self.calls: dict[int, _Call] = {}  # chat tool-call index → its open item
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chat_usage: dict[str, Any] | None = None
        self.response: dict[str, Any] | None = None  # the final Response object

    # -- framing ----------------------------------------------------------------------

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **payload}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _items(self) -> list[dict[str, Any]]:
        return [item for item in self.output if item is not None]

    def start(self) -> bytes:
        resp = response_object(self.turn, status="in_progress", output=[])
        return self._event("response.created", {"response": resp}) + self._event(
            "response.in_progress", {"response": resp}
        )

    # -- the engine's chunks ------------------------------------------------------------

    def feed(self, block: bytes) -> bytes:
        """The Responses events of one engine block (one or more chat chunks)."""
        out: list[bytes] = []
        for raw in block.split(b"\n\n"):
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                self._chunk(chunk, out)
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.chat_usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n is 1 on this route
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text(text, out)
            for call in delta.get("tool_calls") or ():
                self._call(call, out)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def _text(self, text: str, out: list[bytes]) -> None:
        if self.text_id is None:
            self.text_index = len(self.output)
            item = message_item("", "in_progress")
            self.text_id, self.text = item["id"], ""
            self.output.append(None)
            out.append(
                self._event(
                    "response.output_item.added", {"output_index": self.text_index, "item": item}
                )
            )
            out.append(
                self._event(
                    "response.content_part.added",
                    {
                        **self._where(),
                        "part": {
                            "type": "output_text",
                            "text": "",
                            "annotations": [],
                            "logprobs": [],
                        },
                    },
                )
            )
        self.text += text
        out.append(
            self._event(
                "response.output_text.delta", {**self._where(), "delta": text, "logprobs": []}
            )
        )

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.text_id, "output_index": self.text_index, "content_index": 0}

    def _close_text(self, status: str, out: list[bytes]) -> None:
        if self.text_id is None:
            return
        where, text = self._where(), self.text
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        out.append(
            self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
        )
        out.append(self._event("response.content_part.done", {**where, "part": part}))
        item = message_item(text, status, self.text_id)
        self.output[self.text_index] = item
        out.append(
            self._event(
                "response.output_item.done", {"output_index": self.text_index, "item": item}
            )
        )
        self.text_id = None

    def _call(self, call: Any, out: list[bytes]) -> None:
        if not isinstance(call, dict):
            return
        index = int(call.get("index") or 0)
        fn = call.get("function") or {}
        open_call = self.calls.get(index)
        if open_call is None:
            self._close_text("completed", out)  # a call after text ends the text item
            open_call = _Call(
                len(self.output), str(call.get("id") or new_id("call")), str(fn.get("name") or "")
            )
            self.calls[index] = open_call
            self.output.append(None)
            item = call_item(open_call.call_id, open_call.name, "", "in_progress", open_call.id)
            out.append(
                self._event(
                    "response.output_item.added",
                    {"output_index": open_call.output_index, "item": item},
                )
            )
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            open_call.arguments += args
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    {
                        "item_id": open_call.id,
                        "output_index": open_call.output_index,
                        "delta": args,
                    },
                )
            )

    # -- the end ---------------------------------------------------------------------------

    def finish_events(self) -> bytes:
        """Close every open item, then `response.completed` (or `response.incomplete`)."""
        status = "incomplete" if self.finish == "length" else "completed"
        out: list[bytes] = []
        self._close_all(status, out)
        self.usage = usage_of(self.chat_usage)
        self.response = response_object(
            self.turn, status=status, output=self._items(), usage=self.usage, finish=self.finish
        )
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        out.append(self._event(kind, {"response": self.response}))
        return b"".join(out)

    def _close_all(self, status: str, out: list[bytes]) -> None:
        self._close_text(status, out)
        for c in self.calls.values():
            where = {"item_id": c.id, "output_index": c.output_index}
            out.append(
                self._event(
                    "response.function_call_arguments.done", {**where, "arguments": c.arguments}
                )
            )
            item = call_item(c.call_id, c.name, c.arguments, "completed", c.id)
            self.output[c.output_index] = item
            out.append(
                self._event(
                    "response.output_item.done", {"output_index": c.output_index, "item": item}
                )
            )
        self.calls.clear()

    def failed_events(self, exc: ServingError) -> bytes:
        """A failure after the stream began: `error`, then `response.failed` with what was
        produced so far (the open items cut short)."""
        out = [
            self._event(
                "error", {"code": exc.code or exc.type, "message": exc.message, "param": exc.param}
            )
        ]
        open_calls = {c.output_index: c for c in self.calls.values()}
        items: list[dict[str, Any]] = []
        for i, item in enumerate(self.output):
            if item is not None:
                items.append(item)
            elif i == self.text_index and self.text_id is not None:
                items.append(message_item(self.text, "incomplete", self.text_id))
            elif i in open_calls:
                c = open_calls[i]
                items.append(call_item(c.call_id, c.name, c.arguments, "incomplete", c.id))
        self.usage = usage_of(self.chat_usage)
        error = {"code": "server_error", "message": exc.message}
        self.response = response_object(
            self.turn, status="failed", output=items, usage=self.usage, error=error
        )
        out.append(self._event("response.failed", {"response": self.response}))
        return b"".join(out)
