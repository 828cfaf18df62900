"""Key administration: create, list, revoke and read usage — behind the admin API
(`gateway.api.admin`) and `gateway keys` alike.

Records go to Redis when `GATEWAY_REDIS_URL` is set, else to the keys file
(`GATEWAY_KEYS_FILE`); with neither, hashed keys are off and every call says how to turn
them on. Not here: checking a presented key or limiting it (`gateway.limits`).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from gateway.errors import InvalidRequest, NotFound
from gateway.keys import KeyPolicy, KeyRecord, mint
from gateway.limits import Tenancy
from gateway.state_store import StoreUnavailable


class KeyAdmin:
    """Create, list, revoke keys and read their usage: the admin API and `gateway keys`.

    Records go to the store when it is Redis, else to the keys file; with neither, hashed
    keys are off and every call here says how to turn them on."""

    def __init__(self, tenancy: Tenancy):
        self.t = tenancy

    def _check(self) -> None:
        if not self.t.hashed:
            raise InvalidRequest(
                "Hashed API keys are off: set GATEWAY_KEYS_FILE or GATEWAY_REDIS_URL.",
                code="keys_disabled",
            )

    async def _all(self) -> dict[str, KeyRecord]:
        if self.t.store.name == "memory":
            assert self.t.keys_file is not None
            return self.t.keys_file.load()
        try:
            raw = await self.t.store.list_keys()
        except StoreUnavailable:
            raise self.t._unavailable() from None
        return {k: KeyRecord.model_validate_json(v) for k, v in raw.items()}

    async def _put(self, record: KeyRecord) -> None:
        if self.t.store.name == "memory":
            assert self.t.keys_file is not None
            records = self.t.keys_file.load()
            records[record.id] = record
            self.t.keys_file.save(records)
        else:
            try:
                await self.t.store.put_key(record.id, record.model_dump_json())
            except StoreUnavailable:
                raise self.t._unavailable() from None
        self.t._keys.pop(record.id, None)
        self.t._file_checked = -math.inf

    async def create(self, policy: dict[str, Any]) -> tuple[str, KeyRecord]:
        self._check()
        allowed = set(KeyPolicy.model_fields)
        unknown = set(policy) - allowed
        if unknown:
            raise InvalidRequest(f"Unknown key field(s): {', '.join(sorted(unknown))}.")
        try:
            token, record = mint(**policy)
        except ValidationError as e:
            err = e.errors()[0]
            raise InvalidRequest(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}", param=str(err["loc"][0])
            ) from None
        await self._put(record)
        return token, record

    async def list(self) -> list[dict[str, Any]]:
        self._check()
        return [r.public() for r in sorted((await self._all()).values(), key=lambda r: r.created)]

    async def get(self, key_id: str) -> KeyRecord:
        self._check()
        record = (await self._all()).get(key_id)
        if record is None:
            raise NotFound(f"No API key with id `{key_id}`.")
        return record

    async def revoke(self, key_id: str) -> dict[str, Any]:
        record = await self.get(key_id)
        record.revoked = True
        await self._put(record)
        return record.public()

    async def usage(self, key_id: str) -> dict[str, Any]:
        """The ledger by day and model, plus what is in flight now."""
        await self.get(key_id)
        try:
            ledger = await self.t.store.usage(key_id)
            in_flight, reserved = await self.t.store.outstanding(key_id)
        except StoreUnavailable:
            raise self.t._unavailable() from None
        days: dict[str, dict[str, dict[str, int]]] = {}
        for day, fields in ledger.items():
            for name, count in fields.items():
                model, _, what = name.partition("\x1f")
                days.setdefault(day, {}).setdefault(model, {})[what] = count
        return {"id": key_id, "days": days, "in_flight": in_flight, "reserved_tokens": reserved}
