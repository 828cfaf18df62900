"""Who may call: the client keys on every API route, the admin key on the admin routes.

Owns reading the Bearer token. Checking a client key is `gateway.limits.Tenancy` (hashed
keys in the store or keys file, or the plaintext `GATEWAY_API_KEYS` list); the admin key is
compared here in constant time. What a key may do beyond passing is admission's
(`Tenancy.admit`).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from gateway.api.requests import Incoming
from gateway.errors import AuthenticationError, PermissionDenied

if TYPE_CHECKING:
    from gateway.limits import Tenant
    from gateway.state import Gateway


def _bearer(inc: Incoming) -> str | None:
    auth = inc.header(b"authorization") or ""
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def check_client_key(gw: Gateway, inc: Incoming) -> Tenant | None:
    """The tenant of a hashed key, or None when a simpler mode let the caller in."""
    return await gw.tenancy.authenticate(_bearer(inc))


def check_admin_key(gw: Gateway, inc: Incoming) -> None:
    admin = gw.settings.admin_key
    if not admin:
        raise PermissionDenied("The admin API is disabled: set GATEWAY_ADMIN_KEY to enable it.")
    token = _bearer(inc)
    if token is None or not hmac.compare_digest(token, admin):
        raise AuthenticationError("The admin API needs the admin key as a Bearer token.")
