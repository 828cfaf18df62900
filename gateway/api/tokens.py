"""`POST /tokenize` and `POST /detokenize`: vLLM's token endpoints, answered by the model's
engine (`Engine.tokenize` / `detokenize`: the embedded engine with its own tokenizer and
chat template, upstream engines relayed to a worker).

Cold routes: authenticated like every API route and bounded like every body, but no
limiter decision, budget or admission queue — they generate nothing, and a load generator
aligning its prompts (`gateway bench`) must not spend a key's budget. `model` may be left
out when exactly one generate model is served (vLLM's own server serves one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from engines.errors import ServingError
from gateway.api.auth import check_client_key
from gateway.api.requests import Incoming, read_json
from gateway.errors import InvalidRequest
from gateway.redact import public_error

if TYPE_CHECKING:
    from gateway.served import Target
    from gateway.state import Gateway

__all__ = ["detokenize", "tokenize"]


async def _target(request: Request) -> tuple[Gateway, Target, dict[str, Any]]:
    gw: Gateway = request.app.state.gateway
    inc = Incoming(request.scope, request.receive)
    await check_client_key(gw, inc)
    body = await read_json(inc, gw.settings.max_body_bytes)
    name = body.get("model")
    if name is None:
        generate = [n for n, e in gw.served.engines.items() if e.spec.task == "generate"]
        if len(generate) == 1:
            name = body["model"] = generate[0]
    target = gw.served.resolve(name)
    if target.spec.task != "generate":
        raise InvalidRequest(
            f"The model `{target.spec.name}` serves embeddings; /tokenize serves generate models.",
            param="model",
        )
    return gw, target, body


def _answer(obj: dict[str, Any]) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")


async def tokenize(request: Request) -> Response:
    _, target, body = await _target(request)
    try:
        return _answer(await target.engine.tokenize(body))
    except Exception as exc:
        raise _public(exc, target) from None


async def detokenize(request: Request) -> Response:
    _, target, body = await _target(request)
    try:
        return _answer(await target.engine.detokenize(body))
    except Exception as exc:
        raise _public(exc, target) from None


def _public(exc: Exception, target: Target) -> Exception:
    """An engine's error with nothing internal in it (`gateway.redact`)."""
    if not isinstance(exc, ServingError):
        return exc  # an engine bug: the app's handler logs it and answers 500
    return public_error(exc, target.spec.name, "-")
