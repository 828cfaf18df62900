"""The pipelined RESP client of the hot-path scripts against a redis-server of the test's
own: the script cache filled on first use (NOSCRIPT → EVAL), a reply that comes after its
call's timeout dropped without shifting later replies, a stopped server failing calls at
once and a restarted one served again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.state_store import Limits, StoreUnavailable
from gateway.state_store.redis import RedisStore
from gateway.state_store.resp import RespClient, encode, parse
from tests.gateway.procs import OwnRedis

BUSY = """
local t0 = redis.call('TIME')
repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1e6 + t[2] - t0[2] > 500000
return 'late'
"""


def test_parse_every_reply_kind_and_partial_input() -> None:
    raw = b"*4\r\n+OK\r\n:-3\r\n$5\r\nhello\r\n*2\r\n$-1\r\n-ERR bad\r\n"
    value, end = parse(raw, 0)
    assert end == len(raw)
    assert value[:3] == ["OK", -3, "hello"] and value[3][0] is None
    assert str(value[3][1]) == "ERR bad"
    for cut in range(1, len(raw)):  # any prefix is incomplete, never a wrong value
        assert parse(raw[:cut], 0)[1] == 0
    assert encode("GET", "k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


def test_late_reply_dropped_outage_and_recovery(tmp_path: Path) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    try:

        async def run() -> None:
            store = RedisStore(own.url, "t", timeout_s=0.2)
            try:
                await use(store)
            finally:
                await store.close()

        async def use(store: RedisStore) -> None:
            limits = Limits(rpm=100)
            d = await store.admit("k", limits, 1, 0.0)  # fresh server: NOSCRIPT, then EVAL
            assert d.admitted and d.remaining_requests == 99
            slow = RespClient(own.url, timeout_s=0.2)
            # A script busy for 0.5 s answers after the call's timeout; the PING after it
            # still gets its own reply, not the late "late".
            try:
                with pytest.raises(StoreUnavailable, match="no reply"):
                    await slow.call(encode("EVAL", BUSY, 0))
                await asyncio.sleep(0.6)  # the late reply arrives meanwhile
                assert await slow.call(encode("PING")) == "PONG"
                assert await slow.call(encode("ECHO", "x")) == "x"
            finally:
                await slow.close()
            own.stop()
            with pytest.raises(StoreUnavailable):
                await store.admit("k", limits, 1, 0.0)
            own.start()
            d = await store.admit("k", limits, 1, 0.0)
            assert d.admitted  # the bucket persisted (appendonly) and served again

        asyncio.run(run())
    finally:
        own.stop()
