"""Mid-stream continuation: a stream whose worker dies after its first byte reached the
client goes on from another worker, in the same response.

Owns, for a model with `options.continue_streams: true`: which requests may be continued
(`continuable`: n = 1, a text prompt, no echo, no guided decoding), which failures
continue (a reset or close before `[DONE]`, a stall past `read_timeout_s`, a wedged worker
failed by the health loop, a worker's error event with a 5xx status; never a 4xx error
event, never after a tool-call or reasoning delta), the continuation request (completions:
the prompt plus the text streamed so far; chat: the messages plus an assistant message
with that text, with vLLM's `continue_final_message: true, add_generation_prompt: false`;
`max_tokens` / `max_completion_tokens` / `min_tokens` less the tokens already streamed),
rewriting the continuation's chunks into the first attempt's (its `id`, `created`,
`model`, `system_fingerprint`; its role chunk dropped; usage merged) and the check of the
option at config load (`continuation_issues`). Continuations are attempts like retries:
each spends one of `max_retries` and of the retry budget, and needs a worker not yet
tried; without one the stream ends with an error event and no `[DONE]`, as without the
option.

Tokens, never deltas: `k`, the tokens streamed before an attempt, is the worker's own
count where the client's chunks carried it (vLLM's `stream_options.continuous_usage_stats`,
when the client asked for it), else the next worker's `POST /tokenize` of the text streamed
so far (the engine's `tokenize`: vLLM's `count`). vLLM puts several tokens in one delta under load
and with speculative decoding, so counting deltas over-runs `max_tokens`. When neither
answers, the stream is not continued (its `max_tokens` and usage could not be kept).
Usage, with the last attempt's usage `(p, c)`: completion_tokens = k + c; prompt_tokens =
the sum of every attempt's prompt, where each attempt's prompt is the original prompt P
plus the partial answer it was given, and P = p − k (exact when the partial answer
re-tokenizes to its k tokens, which is what /tokenize counts). One continuation after k
tokens: prompt_tokens = 2·P + k.

Does not own sending (`engines.upstream.send`: picking, retries before the first byte,
ejection accounting) nor relaying an attempt (`engines.upstream.attempt`, the same relay
as a stream that is not continued); it reaches the engine only through `Host`. The cost
when on: each forwarded run is appended to a list (no parsing) until a failure; only then
is what the client saw parsed; a continued attempt's chunks are parsed and re-dumped (the
rare path).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from engines.base import GenerateRequest, ServingError, SpecIssue
from engines.upstream.relay import event_data, process_run
from engines.upstream.sse import split_events

if TYPE_CHECKING:
    from engines.spec import ModelSpec
    from engines.upstream.attempt import Attempt, Rewrite
    from engines.upstream.endpoints import Endpoint
    from engines.upstream.options import UpstreamOptions
    from engines.upstream.outliers import RetryBudget

__all__ = ["Continuation", "Host", "continuable", "continuation_issues", "continued_stream"]

log = logging.getLogger("engines.upstream")

# Guided decoding restarts its grammar on a continuation: such requests are not continued.
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
# The fields of the first attempt every continued chunk carries.
_HEAD = ("id", "created", "model", "system_fingerprint")


class Host(Protocol):
    """The engine as a continued stream uses it (`OpenAIEngine`)."""

    continuations: int
    opts: UpstreamOptions
    budget: RetryBudget

    def attempt(
        self,
        req: GenerateRequest,
        body: dict[str, Any] | None = None,
        tried: list[Endpoint] | None = None,
    ) -> Attempt:
        """An attempt of `req`'s stream (with `body`, on a worker not in `tried`)."""
        ...

    def chunk_rewrite(self, req: GenerateRequest) -> tuple[Rewrite, bool]:
        """The first attempt's rewrite of a run, and whether every run takes it."""
        ...

    def has_worker(self, req: GenerateRequest, tried: list[Endpoint]) -> bool:
        """Whether a worker not in `tried` may take an attempt now."""
        ...

    async def tokenize(
        self, body: dict[str, Any], avoid: Sequence[Endpoint] = ()
    ) -> dict[str, Any]:
        """vLLM's `POST /tokenize` on a worker not in `avoid`."""
        ...


def continuation_issues(spec: ModelSpec, unsupported: str | None) -> list[SpecIssue]:
    """Where `options.continue_streams: true` cannot apply: an engine whose workers cannot
    continue a message (`unsupported` says why), or a model with one worker (a
    continuation goes to another)."""
    if spec.options.get("continue_streams") is not True:
        return []
    path = "options.continue_streams"
    if unsupported is not None:
        return [SpecIssue(path=path, message=unsupported)]
    workers = len(spec.endpoints) if spec.endpoints else spec.replicas
    if workers < 2:
        return [
            SpecIssue(
                path=path,
                message="a continuation goes to another worker: list at least two endpoints "
                "(or replicas: 2 or more)",
            )
        ]
    return []


def continuable(chat: bool, body: dict[str, Any]) -> bool:
    """Whether a stream of this request may be continued on another worker."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    if body.get("echo"):
        return False
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return False
    if any(body.get(key) is not None for key in _GUIDED):
        return False
    if chat:
        return isinstance(body.get("messages"), list)
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)
    )


@dataclass(slots=True)
class _Seen:
    """What the client has received so far (parsed from the forwarded runs)."""

    head: dict[str, Any]
    text: str
    # The worker's own count of the tokens streamed (per-chunk usage), when it sent one.
    tokens: int | None
    role: bool
    # A finish reason, a tool-call or reasoning delta, or a second choice was streamed.
    final: bool


class Continuation:
    """One stream's continuation state: the runs forwarded so far (`runs`, appended by the
    relay), the next attempt's body (`next_body`) and the rewrite of its chunks
    (`chunk`)."""

    __slots__ = (
        "appended",
        "attempts",
        "body",
        "chat",
        "extra",
        "head",
        "role_sent",
        "runs",
        "streamed",
    )

    def __init__(self, chat: bool, body: dict[str, Any]) -> None:
        self.chat = chat
        self.body = body
        self.runs: list[bytes] = []
        self.head: dict[str, Any] = {}
        # The client has its one role chunk (chat): a continuation's is dropped.
        self.role_sent = False
        self.attempts = 1
        # Tokens streamed before the current attempt; whether they were in its prompt; the
        # sum of the partial answers every continuation was given (usage).
        self.streamed = 0
        self.appended = False
        self.extra = 0

    def seen(self) -> _Seen:
        """What the client has received so far, parsed from the forwarded runs."""
        head: dict[str, Any] = {}
        parts: list[str] = []
        tokens: int | None = None
        role = final = False
        for event in split_events(b"".join(self.runs)):
            data = event_data(event)
            if data is None or data == b"[DONE]":
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if not head:
                head = {k: obj[k] for k in _HEAD if k in obj}
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                tokens = usage["completion_tokens"]
            for choice in obj.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                if choice.get("index", 0) != 0 or choice.get("finish_reason") is not None:
                    final = True
                if self.chat:
                    delta = choice.get("delta")
                    if not isinstance(delta, dict):
                        continue
                    role = role or "role" in delta
                    if delta.get("tool_calls") or delta.get("reasoning_content"):
                        final = True
                    if delta.get("reasoning"):
                        final = True
                    text = delta.get("content")
                else:
                    text = choice.get("text")
                if isinstance(text, str) and text:
                    parts.append(text)
        return _Seen(head, "".join(parts), tokens, role, final)

    def next_body(self, seen: _Seen, tokens: int) -> dict[str, Any] | None:
        """The body of a continuation after a failure, given what the client saw (`seen`)
        and the `tokens` it holds, or None when the stream cannot be continued (it had
        finished, streamed a tool call, reasoning or a second choice, or has no tokens
        left)."""
        if seen.final:
            return None
        body = dict(self.body)
        if seen.text:
            if self.chat:
                messages = list(body["messages"])
                last = messages[-1] if messages else None
                if (
                    body.get("continue_final_message")
                    and isinstance(last, dict)
                    and last.get("role") == "assistant"
                    and isinstance(last.get("content"), str)
                ):
                    messages[-1] = {**last, "content": last["content"] + seen.text}
                else:
                    messages.append({"role": "assistant", "content": seen.text})
                body["messages"] = messages
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            else:
                prompt = body["prompt"]
                body["prompt"] = (
                    prompt + seen.text if isinstance(prompt, str) else [prompt[0] + seen.text]
                )
        for key in ("max_tokens", "max_completion_tokens"):
            limit = body.get(key)
            if isinstance(limit, int):
                if limit - tokens < 1:
                    return None
                body[key] = limit - tokens
        floor = body.get("min_tokens")
        if isinstance(floor, int):
            body["min_tokens"] = max(0, floor - tokens)
        if not self.head:
            self.head = seen.head
        self.role_sent = self.role_sent or seen.role
        self.attempts += 1
        self.streamed = tokens
        self.appended = bool(seen.text)
        if self.appended:
            self.extra += tokens
        return body

    def chunk(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """A continued attempt's chunk as the client gets it (`relay.process_run`'s
        transform): the first attempt's head, its role chunk dropped (None), usage
        merged."""
        head = self.head
        if not head:  # nothing had reached the client: this attempt's head it is
            head = self.head = {k: obj[k] for k in _HEAD if k in obj}
        obj.update(head)
        if "system_fingerprint" not in head:
            obj.pop("system_fingerprint", None)
        choices = obj.get("choices")
        if self.chat and isinstance(choices, list):
            if self.role_sent:
                kept = [c for c in choices if not _role_only(c)]
                if not kept and choices and not obj.get("usage"):
                    return None
                obj["choices"] = kept
            else:
                self.role_sent = True
        usage = obj.get("usage")
        if isinstance(usage, dict):
            obj["usage"] = self._merge(usage)
        return obj

    def _merge(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        original = max(0, prompt - (self.streamed if self.appended else 0))
        prompt = self.attempts * original + self.extra
        completion += self.streamed
        return {
            **usage,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _role_only(choice: Any) -> bool:
    """A chat choice that only announces the role (a continuation's first chunk): the
    client already has one. A role next to content loses the role and stays."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if not isinstance(delta, dict) or "role" not in delta:
        return False
    del delta["role"]
    return (
        not any(delta.values())
        and choice.get("finish_reason") is None
        and not choice.get("logprobs")
    )


async def continued_stream(
    host: Host, req: GenerateRequest, chat: bool
) -> AsyncGenerator[bytes, None]:
    """The stream of `req` with continuation on: each attempt's relay
    (`engines.upstream.attempt`), and after a failure that may continue, the next attempt
    on a worker not yet tried."""
    cont = Continuation(chat, req.body)
    rewrite, slow = host.chunk_rewrite(req)
    attempt = host.attempt(req)
    tried: list[Endpoint] = []
    broke: ServingError | None = None
    while True:
        runs = attempt.relay(rewrite, slow, keep=cont.runs, tail=req.tail)
        try:
            async for run in runs:
                yield run
            return
        except ServingError as e:
            # Not sent (no worker took the first attempt), or the request itself is wrong
            # (a 4xx error event): as without the option.
            if attempt.ep is None or e.status < 500:
                raise
            broke = e
        finally:
            await runs.aclose()
        ep = attempt.ep
        assert ep is not None  # a first attempt that was not sent raised above
        tried.append(ep)
        seen = cont.seen()
        if seen.final or len(tried) > host.opts.max_retries or not host.has_worker(req, tried):
            raise broke
        tokens = seen.tokens
        if tokens is None:
            tokens = await _count(host, req, seen.text, tried)
        if tokens is None:
            raise broke
        body = cont.next_body(seen, tokens)
        if body is None or not host.budget.try_retry():
            raise broke
        req.retries = len(tried)
        attempt = host.attempt(req, body, tried)
        try:
            ep = await attempt.open()
        except ServingError as e:
            log.warning("request %s: continuation failed: %s", req.request_id, e.message)
            raise broke from e
        host.continuations += 1
        log.info("request %s: continued on %s after: %s", req.request_id, ep.url, broke.message)
        rewrite = partial(process_run, rename=None, transform=cont.chunk, error_of=attempt.error_of)
        slow = True


async def _count(host: Host, req: GenerateRequest, text: str, tried: list[Endpoint]) -> int | None:
    """The tokens of `text` by the tokenizer of a worker not yet tried (vLLM's
    `POST /tokenize`, no special tokens), or None when none can say (then the stream is not
    continued)."""
    if not text:
        return 0
    try:
        body = {"prompt": text, "add_special_tokens": False}
        answer = await host.tokenize(body, tried)
    except ServingError as e:
        why = e.message
    else:
        count = answer.get("count")
        if isinstance(count, int) and count >= 0:
            return count
        why = "no count in its answer"
    log.warning(
        "request %s: not continued: no worker counted the tokens streamed so far "
        "(POST /tokenize: %s)",
        req.request_id,
        why,
    )
    return None
