"""The API routes: one module per route family, and the one table that lists them all.

`HOT` routes are raw ASGI handlers the front door (`gateway.app.FrontDoor`) calls directly
for POSTs, skipping the framework (measured: a quarter of the gateway's CPU under load went
to FastAPI's middleware and router). `COLD` routes are ordinary Starlette endpoints served
by the FastAPI app. Every path the gateway answers is in one of the two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.api import (
    adapters,
    admin,
    embeddings,
    generate,
    models,
    ops,
    responses,
    status,
    tokens,
)

if TYPE_CHECKING:
    from gateway.state import Gateway

HotHandler = Callable[["Gateway", MutableMapping[str, Any], Any, Any], Awaitable[None]]

# POST only; the front door answers any other method on these paths with 405.
HOT: dict[str, HotHandler] = {
    "/v1/chat/completions": generate.chat_completions,
    "/v1/completions": generate.completions,
    "/v1/embeddings": embeddings.embeddings,
    "/v1/responses": responses.create,
}

# The status page: plain files, no build step.
UI_DIR = Path(__file__).resolve().parent.parent / "ui"

COLD: list[BaseRoute] = [
    Route("/v1/models", models.list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
    Route("/v1/responses/{response_id}", responses.retrieve, methods=["GET"]),
    Route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", responses.input_items, methods=["GET"]),
    Route("/tokenize", tokens.tokenize, methods=["POST"]),
    Route("/detokenize", tokens.detokenize, methods=["POST"]),
    Route("/v1/load_lora_adapter", adapters.load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", adapters.unload_lora_adapter, methods=["POST"]),
    Route("/health", ops.health, methods=["GET"]),
    Route("/health/live", ops.live, methods=["GET"]),
    Route("/health/ready", ops.ready, methods=["GET"]),
    Route("/metrics", ops.metrics, methods=["GET"]),
    Route("/status", status.status, methods=["GET"]),
    Route("/status/series", status.series, methods=["GET"]),
    Mount("/ui", app=StaticFiles(directory=UI_DIR, html=True), name="ui"),
    Route("/admin/keys", admin.create_key, methods=["POST"]),
    Route("/admin/keys", admin.list_keys, methods=["GET"]),
    Route("/admin/keys/{key_id}", admin.get_key, methods=["GET"]),
    Route("/admin/keys/{key_id}", admin.revoke_key, methods=["DELETE"]),
    Route("/admin/keys/{key_id}/usage", admin.key_usage, methods=["GET"]),
]

# Beside /admin/*: the routes that move to GATEWAY_ADMIN_PORT when it is set.
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})

__all__ = ["ADMIN_PATHS", "COLD", "HOT", "HotHandler"]
