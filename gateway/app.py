"""`create_app()`: the FastAPI application, and the lifespan that owns every resource.

The `Gateway` object built here holds the settings, the served models (engines) and the
metrics; the lifespan starts and stops them, and routes reach it as
`request.app.state.gateway` (the hot routes get it from the front door). No module-level
state anywhere. Errors of every kind, raised
anywhere, are rendered here by one handler into the OpenAI envelope.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engines.base import EngineContext, ServingError
from gateway.api import adapters, embeddings, generate, models, ops
from gateway.api.common import RequestIds, error_response
from gateway.catalog import Catalog, load_catalog
from gateway.errors import InvalidRequest, NotFound, error_body, error_headers
from gateway.metrics import Metrics
from gateway.served import ServedModels
from gateway.settings import Settings

log = logging.getLogger("gateway")


class Gateway:
    """Everything one running gateway owns."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.client_keys = settings.client_keys
        self.served = ServedModels(
            catalog=catalog,
            context=EngineContext(
                cache_dir=settings.cache_dir, config_dir=catalog.base_dir, progress=_progress
            ),
        )
        self.metrics = Metrics(self.served.statuses, self.served.adapter_counts)
        self.request_ids = RequestIds()


def _progress(line: str) -> None:
    log.info("%s", line)


def _error_response(exc: ServingError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error_headers(exc)}
    return Response(error_body(exc), status_code=exc.status, headers=headers)


async def _on_serving_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return _error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(NotFound(f"Unknown path {request.url.path}."))
    err = ServingError(str(exc.detail))
    err.status = exc.status_code  # type: ignore[misc]
    err.type = "invalid_request_error"  # type: ignore[misc]
    resp = _error_response(err)
    if exc.headers:  # e.g. a 405's Allow
        resp.headers.update(exc.headers)
    return resp


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return _error_response(InvalidRequest(f"Invalid request: {first['msg']}.", param=param))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _error_response(ServingError("The server had an error while processing the request."))


def create_app(settings: Settings | None = None, catalog: Catalog | None = None) -> FrontDoor:
    settings = settings or Settings()
    catalog = catalog or load_catalog(settings.config)
    gateway = Gateway(settings, catalog)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.served.start()
        try:
            yield
        finally:
            await gateway.served.stop()

    routes: list[Any] = [
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
        Route("/v1/load_lora_adapter", adapters.load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", adapters.unload_lora_adapter, methods=["POST"]),
        Route("/health", ops.health, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
    ]
    app = FastAPI(
        title="LLM gateway",
        lifespan=lifespan,
        routes=routes,
        exception_handlers={
            ServingError: _on_serving_error,
            HTTPException: _on_http_error,
            RequestValidationError: _on_validation_error,
            Exception: _on_unexpected,
        },
    )
    app.state.gateway = gateway
    return FrontDoor(app, gateway)


HotHandler = Callable[[Gateway, MutableMapping[str, Any], Any, Any], Awaitable[None]]


class FrontDoor:
    """The ASGI entry point: POSTs to the generate and embedding routes go straight to
    their raw handlers; everything else (lifespan included) goes to the FastAPI app.

    Measured reason: with FastAPI's middleware stack and router in front, a quarter of
    the gateway's CPU under load went to the framework rather than to the request.
    """

    HOT: ClassVar[dict[str, HotHandler]] = {
        "/v1/chat/completions": generate.chat_completions,
        "/v1/completions": generate.completions,
        "/v1/embeddings": embeddings.embeddings,
    }

    def __init__(self, app: FastAPI, gateway: Gateway):
        self.app = app
        self.state = app.state
        self.gateway = gateway

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = self.HOT.get(scope["path"])
            if handler is not None:
                if scope["method"] != "POST":
                    await _method_not_allowed(scope, receive, send)
                    return
                try:
                    await handler(self.gateway, scope, receive, send)
                except Exception as exc:
                    log.exception("unhandled error on %s", scope["path"], exc_info=exc)
                    err = ServingError("The server had an error while processing the request.")
                    with contextlib.suppress(Exception):  # the response may have started
                        await error_response(err, "-")(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _method_not_allowed(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    err = InvalidRequest(f"Method {scope['method']} is not allowed here; use POST.")
    err.status = 405  # type: ignore[misc]
    resp = error_response(err, "-")
    resp.headers = [*resp.headers, (b"allow", b"POST")]
    await resp(scope, receive, send)


def app_from_env() -> FrontDoor:
    """An app configured from GATEWAY_* alone: the factory for other ASGI servers
    (e.g. `granian --interface asgi --factory gateway.app:app_from_env`)."""
    logging.basicConfig(level=Settings().log_level.upper())
    return create_app()
