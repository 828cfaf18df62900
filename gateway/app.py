"""`create_app()`: the application, its front door, and the lifespan that owns every resource.

Builds the `Gateway` state (`gateway.state`), whose engines the lifespan starts and stops;
puts the `FrontDoor` before the FastAPI app so the hot routes skip the framework; and
installs the framework's exception handlers. Rendering an error (body, headers, SSE event)
is `gateway.errors`' alone; the handlers here and `error_response` in the routes only send
what it renders.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import logging
import sys
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from engines.base import ServingError
from gateway.api import ADMIN_PATHS, COLD, HOT
from gateway.api.requests import error_response
from gateway.catalog import Catalog, load_catalog
from gateway.cors import Cors
from gateway.cors import enabled as cors_enabled
from gateway.errors import MethodNotAllowed, NotFound, error_body, error_headers
from gateway.openapi import build_openapi
from gateway.settings import Settings, SettingsError, load_settings
from gateway.state import Gateway

log = logging.getLogger("gateway")


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


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _error_response(ServingError("The server had an error while processing the request."))


def _version() -> str:
    try:
        return importlib.metadata.version("llm-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def create_app(settings: Settings | None = None, catalog: Catalog | None = None) -> FrontDoor:
    settings = settings or Settings()
    catalog = catalog or load_catalog(settings.config)
    gateway = Gateway(settings, catalog)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.tenancy.start()
        await gateway.served.start()
        gateway.adapter_sync.start()
        if gateway.tracer is not None:
            gateway.tracer.start()
        gateway.series.start()
        # What start-up built lives as long as the process: out of the collector's sight, a
        # full collection walks only what serving allocates. Relaying 64 streams, the
        # collector's CPU time (gc callbacks) went from 0.30 s to 0.21 s per ~2,600
        # requests, about 3 % of the process's CPU (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await gateway.series.stop()
            await gateway.adapter_sync.stop()
            await gateway.served.stop()
            gateway.access_log.flush()
            if gateway.tracer is not None:
                await gateway.tracer.stop()
            await gateway.tenancy.close()
            await gateway.responses.close()

    app = FastAPI(
        title="LLM gateway",
        lifespan=lifespan,
        routes=list(COLD),
        exception_handlers={
            ServingError: _on_serving_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
    )
    app.state.gateway = gateway
    # Dispatch stays raw; the document is built from the protocol models (gateway.openapi).
    document = build_openapi(app.title, _version())
    app.openapi = lambda: document  # type: ignore[method-assign]
    return FrontDoor(app, gateway)


class FrontDoor:
    """The ASGI entry point: POSTs to the generate and embedding routes go straight to
    their raw handlers; everything else (lifespan included) goes to the FastAPI app.

    Measured reason: with FastAPI's middleware stack and router in front, a quarter of
    the gateway's CPU under load went to the framework rather than to the request.
    Browser requests (an `Origin` header) pass `gateway.cors` first, on every route.
    """

    def __init__(self, app: FastAPI, gateway: Gateway):
        self.app = app
        self.state = app.state
        self.gateway = gateway
        self.admin_port = gateway.settings.admin_port
        dispatch = self._dispatch if self.admin_port is None else self._split_ports
        self._entry: Any = (
            Cors(dispatch, gateway.settings) if cors_enabled(gateway.settings) else dispatch
        )

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await self._entry(scope, receive, send)

    async def _split_ports(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        """`GATEWAY_ADMIN_PORT` set: admin routes only on that port, the rest only off it."""
        if scope["type"] == "http":
            server = scope.get("server") or (None, None)
            if is_admin_path(scope["path"]) != (server[1] == self.admin_port):
                err = NotFound(f"Unknown path {scope['path']}.")
                await error_response(err, "-")(scope, receive, send)
                return
        await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = HOT.get(scope["path"])
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


def is_admin_path(path: str) -> bool:
    return path.startswith("/admin/") or path == "/admin" or path in ADMIN_PATHS


async def _method_not_allowed(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    err = MethodNotAllowed(f"Method {scope['method']} is not allowed here; use POST.")
    resp = error_response(err, "-")
    resp.headers = [*resp.headers, (b"allow", b"POST")]
    await resp(scope, receive, send)


def app_from_env() -> FrontDoor:
    """An app configured from GATEWAY_* alone: the factory for other ASGI servers
    (e.g. `granian --interface asgi --factory gateway.app:app_from_env`)."""
    try:
        settings = load_settings()
    except SettingsError as e:
        for line in e.lines:
            print(f"gateway: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level.upper())
    return create_app(settings)
