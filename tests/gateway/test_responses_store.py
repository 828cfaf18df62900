"""The stored-responses store, one suite for both backends (this process's memory and the
real Redis under a prefix of its own): owner isolation, delete, the per-key byte bound
evicting the oldest first, and the TTL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.responses.store import MemoryResponses, RedisResponses, ResponseStore, owner_of
from gateway.settings import Settings
from tests.gateway.procs import SHARED_REDIS, clean_prefix, new_prefix


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResponseStore]:
    ttl, cap = 2, 1024
    if request.param == "memory":
        s: ResponseStore = MemoryResponses(ttl, cap)
        yield s
        await s.close()
        return
    prefix = new_prefix()
    settings = Settings(
        cache_dir=tmp_path,
        redis_url=SHARED_REDIS,
        redis_prefix=prefix,
        responses_ttl_s=ttl,
        responses_max_bytes_per_key=cap,
    )
    s = RedisResponses(settings)
    await s.start()
    yield s
    await s.close()
    clean_prefix(prefix)


async def test_owners_never_see_each_other(store: ResponseStore) -> None:
    await store.put("a", "resp_1", b"A" * 10)
    assert await store.get("a", "resp_1") == b"A" * 10
    assert await store.get("b", "resp_1") is None
    assert not await store.delete("b", "resp_1")
    assert await store.get("a", "resp_1") == b"A" * 10
    assert await store.delete("a", "resp_1")
    assert await store.get("a", "resp_1") is None
    assert not await store.delete("a", "resp_1")


async def test_byte_bound_evicts_the_oldest_of_that_owner_only(store: ResponseStore) -> None:
    await store.put("other", "keep", b"x" * 900)
    for i in range(5):  # 5 x 300 bytes into a 1,024-byte bound: the last three stay
        await store.put("a", f"r{i}", bytes([48 + i]) * 300)
    got = [await store.get("a", f"r{i}") for i in range(5)]
    assert [g is not None for g in got] == [False, False, True, True, True]
    assert await store.get("other", "keep") == b"x" * 900
    # A deleted record frees its bytes: two more fit without evicting r3.
    assert await store.delete("a", "r2")
    await store.put("a", "r5", b"5" * 300)
    assert await store.get("a", "r3") is not None
    # Larger than the bound: never stored.
    await store.put("a", "huge", b"h" * 1025)
    assert await store.get("a", "huge") is None
    assert await store.get("a", "r4") is not None


async def test_records_expire(store: ResponseStore) -> None:
    await store.put("a", "old", b"1")
    assert await store.get("a", "old") == b"1"
    await asyncio.sleep(3.0)  # the TTL is 2 s
    assert await store.get("a", "old") is None
    await store.put("a", "new", b"2")  # the expired one's bytes no longer count
    assert await store.get("a", "new") == b"2"


def test_owner_of_scopes() -> None:
    assert owner_of(None, None) == "-"
    one, two = owner_of(None, b"Bearer k1"), owner_of(None, b"Bearer k2")
    assert one != two and one.startswith("p") and "k1" not in one
