"""CORS for every route, the hot ones included: `GATEWAY_CORS_ORIGINS`, `_METHODS`,
`_HEADERS` (comma-separated) and `GATEWAY_CORS_ALLOW_CREDENTIALS`, with vLLM's server's
defaults (any origin, method and header; no credentials).

Browser requests (those with an `Origin` header) go through Starlette's `CORSMiddleware`,
the one vLLM's server uses, so preflights and headers behave the same; a preflight is
answered there and never reaches a route or an engine. Requests without `Origin` (SDKs,
curl, other servers) skip it: the middleware wraps `send` for every message, which on a
stream is one more call per chunk. Owns the wrapper only, not the settings' parsing.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from gateway.settings import Settings


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Cors:
    """Sends browser requests through CORSMiddleware, everything else straight on."""

    __slots__ = ("_app", "_cors")

    def __init__(self, app: ASGIApp, settings: Settings):
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=_split(settings.cors_origins),
            allow_methods=_split(settings.cors_methods),
            allow_headers=_split(settings.cors_headers),
            allow_credentials=settings.cors_allow_credentials,
        )

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, _ in scope["headers"]:
                if name == b"origin":
                    await self._cors(scope, receive, send)
                    return
        await self._app(scope, receive, send)


def enabled(settings: Settings) -> bool:
    """CORS is off when no origin is allowed (`GATEWAY_CORS_ORIGINS=`)."""
    return bool(_split(settings.cors_origins))
