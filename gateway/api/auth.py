"""Who may call: the client keys on every API route, the admin key on the admin routes.

Owns reading the Bearer token and comparing it in constant time. Does not own where keys
come from (settings today) or what a key may do beyond passing (limits are admission's).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from gateway.api.requests import Incoming
from gateway.errors import AuthenticationError, PermissionDenied

if TYPE_CHECKING:
    from gateway.state import Gateway


def _bearer(inc: Incoming) -> str | None:
    auth = inc.header(b"authorization") or ""
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def check_client_key(gw: Gateway, inc: Incoming) -> None:
    keys = gw.client_keys
    if not keys:
        return
    token = _bearer(inc)
    # Compare against every key in constant time: no early exit that leaks which matched.
    if token is None or not sum(hmac.compare_digest(token, k) for k in keys):
        raise AuthenticationError()


def check_admin_key(gw: Gateway, inc: Incoming) -> None:
    admin = gw.settings.admin_key
    if not admin:
        raise PermissionDenied("The admin API is disabled: set GATEWAY_ADMIN_KEY to enable it.")
    token = _bearer(inc)
    if token is None or not hmac.compare_digest(token, admin):
        raise AuthenticationError("The admin API needs the admin key as a Bearer token.")
