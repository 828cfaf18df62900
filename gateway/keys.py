"""API keys: minting, the stored record (salted hash only), and checking a presented key.

A key reads `gk-<id>.<secret>`: the id finds the record in one lookup, the secret is 32
random bytes compared as SHA-256(salt ‖ secret) with `hmac.compare_digest` (constant
time). A fast hash is right here because the secret is random, not a password: a slow KDF
would cost milliseconds per request and protect nothing more. The plaintext exists only in
the answer to `create`.

Owns the record format (`KeyRecord`: policy, expiry, revocation) and the keys file of the
single-box default (`GATEWAY_KEYS_FILE`, JSON, rewritten atomically). Not: where records
live at run time (`gateway.state_store`) nor what happens on a limit (`gateway.limits`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from gateway.state_store import Limits

PREFIX = "gk-"


class KeyPolicy(BaseModel):
    """What `POST /admin/keys` takes (the admin API's documented body)."""

    name: str = ""
    models: list[str] | None = Field(default=None, description="allowed models; null: all")
    rpm: int = Field(default=0, ge=0, description="requests per minute; 0: unlimited")
    tpm: int = Field(default=0, ge=0, description="tokens per minute; 0: unlimited")
    max_parallel: int = Field(default=0, ge=0, description="0: unlimited")
    budget_tokens: int = Field(default=0, ge=0, description="lifetime tokens; 0: unlimited")
    expires_at: float | None = Field(default=None, description="Unix time")


class KeyRecord(BaseModel):
    id: str
    name: str = ""
    salt: str
    hash: str
    created: float = Field(default_factory=time.time)
    revoked: bool = False
    expires_at: float | None = None
    # None: every model; otherwise the model (or adapter) names this key may call.
    models: list[str] | None = None
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    max_parallel: int = Field(default=0, ge=0)
    budget_tokens: int = Field(default=0, ge=0)
    # The prefix-cache salt handed to vLLM for this tenant (never sent by the client).
    cache_salt: str = Field(default_factory=lambda: secrets.token_hex(16))

    @property
    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.max_parallel, self.budget_tokens)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the salt, hash and cache salt."""
        return self.model_dump(exclude={"salt", "hash", "cache_salt"})

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def mint(**policy: Any) -> tuple[str, KeyRecord]:
    """A new key: (the plaintext, shown once; the record to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = KeyRecord(id=key_id, salt=salt, hash=_digest(salt, secret), **policy)
    return f"{PREFIX}{key_id}.{secret}", record


def split(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not token.startswith(PREFIX):
        return None
    key_id, dot, secret = token[len(PREFIX) :].partition(".")
    if not dot or not key_id or not secret or len(token) > 256:
        return None
    return key_id, secret


def matches(record: KeyRecord, secret: str) -> bool:
    return hmac.compare_digest(_digest(record.salt, secret), record.hash)


class KeysFile:
    """The keys of the single-box default: one JSON file of records (hashes only)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, KeyRecord]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text() or "{}")
        return {k: KeyRecord.model_validate(v) for k, v in data.get("keys", {}).items()}

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def save(self, records: dict[str, KeyRecord]) -> None:
        data = {"keys": {k: r.model_dump() for k, r in records.items()}}
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
