"""A real Sentinel failover under load: a primary, its replica and a sentinel of the
test's own (both data nodes with `min-replicas-to-write 1`, as docs/deploy.md asks), a
gateway that knows only the sentinel's address, and eight clients sending requests with
an API key while `SENTINEL FAILOVER` moves the primary.

Asserted: what the gateway answers meanwhile follows the outage policy (`closed`: 503
`service_unavailable` and nothing else while the store does not take writes; `local`:
every request admitted, decided in the process), the outage is seen (the degraded gauge
rises) and ends without a restart (the gauge falls, the new primary runs the scripts),
and nothing admitted is lost: the ledger on the new primary counts exactly the requests
that got a 200, the ones settled during the failover included (queued, then flushed).
A second, smaller test drives the hot-path client alone through a demotion."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.state_store import Limits, Usage
from gateway.state_store.redis import RedisStore
from gateway.state_store.target import RedisTarget
from tests.conftest import start_gateway
from tests.gateway.redis_procs import RedisNode, SentinelNode, wait_for
from tests.gateway.test_api_sim import SimThread
from tests.gateway.test_tenancy import CHAT, create_key, settled

CLIENTS = 8
PREFIX = "gwha"
# A primary waits 5 s by default before a replica's full sync (for more replicas to
# join it); the tests' nodes start it at once.
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


@pytest.fixture(scope="module")
def models(sims: SimThread) -> Iterator[list[dict[str, Any]]]:
    sim = sims.start(model="m", itl_ms=1)
    yield [{"name": "m", "engine": "openai", "endpoints": [sim.url]}]
    sims.call(sim.stop())


class Load:
    """CLIENTS loops of chat requests (2 tokens each) in a thread, until stopped."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.results: list[tuple[int, str]] = []  # (status, error type)
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # raised in the test by __exit__
            self.error = e

    def ok(self) -> int:
        assert self.error is None, self.error
        return sum(status == 200 for status, _ in list(self.results))

    async def _run(self) -> None:
        headers = {"authorization": f"Bearer {self.token}"}
        body = {"model": "m", "messages": CHAT, "max_tokens": 2}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30) as c:

            async def one_client() -> None:
                while not self.stopping.is_set():
                    r = await c.post("/v1/chat/completions", json=body)
                    kind = "" if r.status_code == 200 else r.json()["error"]["type"]
                    if r.status_code == 200:
                        assert r.json()["usage"]["completion_tokens"] == 2
                    self.results.append((r.status_code, kind))

            await asyncio.gather(*(one_client() for _ in range(CLIENTS)))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)
        assert self.error is None, self.error


def _degraded(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("gateway_state_store_degraded"))
    return float(line.split()[-1])


def _scripts_run(node: RedisNode) -> int:
    with node.client() as r:
        stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


@pytest.mark.parametrize("policy", ["local", "closed"])
def test_sentinel_failover_under_load(
    policy: str, models: list[dict[str, Any]], tmp_path: Path
) -> None:
    # With one replica, min-replicas-to-write 1 makes the old primary refuse writes the
    # moment its replica is promoted (its replica link closes): nothing it acknowledges
    # is lost when Sentinel turns it into a replica of the new one.
    ha = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10", *FAST_SYNC)
    nodes: list[Any] = []
    server = None
    try:
        first = RedisNode(tmp_path, *ha).start()
        nodes.append(first)
        second = RedisNode(tmp_path, *ha, "--replicaof", "127.0.0.1", str(first.port)).start()
        nodes.append(second)
        wait_for("the replica in sync", lambda: second.client().info("replication")
                 ["master_link_status"] == "up")  # fmt: skip
        wait_for("a good replica", lambda: first.client().info("replication")
                 .get("min_slaves_good_slaves", 0) >= 1)  # fmt: skip
        sentinel = SentinelNode(tmp_path, first).start()
        nodes.append(sentinel)
        wait_for("the sentinel to see the replica", lambda: sentinel.replicas_seen() >= 1)

        server = start_gateway(
            models,
            tmp_path,
            # With Sentinel the URL's host is not used: the sentinels name the primary.
            redis_url="redis://mymaster/0",
            redis_sentinels=sentinel.address,
            redis_sentinel_master=sentinel.master,
            redis_prefix=PREFIX,
            redis_outage=policy,
            redis_local_share=1,
            redis_timeout_ms=1000,
        )
        made = create_key(server.url, rpm=1_000_000, tpm=100_000_000)
        degraded_seen = 0.0
        with Load(server.url, made["key"]) as load:
            wait_for("requests before the failover", lambda: load.ok() >= 40)
            assert _degraded(server.url) == 0
            # A replica gets no writes until its first REPLCONF ACK after the initial sync
            # (up to a second): a forced failover inside that second loses what the primary
            # took meanwhile, the key's record included (every request then got a 401; seen
            # in two full runs). Fail over once the replica has caught up, as an operator
            # would; what is written under load from here on is what the test is about.
            with first.client() as r:
                mark = int(r.info("replication")["master_repl_offset"])
            wait_for("the replica caught up", lambda: int(
                second.client().info("replication")["slave_repl_offset"]) >= mark)  # fmt: skip
            before = len(load.results)
            scripts_on_second = _scripts_run(second)
            with sentinel.client() as s:
                assert s.execute_command("SENTINEL", "FAILOVER", sentinel.master)

            def moved() -> bool:
                nonlocal degraded_seen
                degraded_seen = max(degraded_seen, _degraded(server.url))
                return sentinel.primary_port() == second.port and first.role() == "slave"

            # Sentinel turns the old primary into a replica some seconds after the
            # promotion; until then the new one has no replica and refuses writes.
            wait_for("the old primary demoted", moved, timeout=40)
            assert second.role() == "master"

            def recovered() -> bool:
                nonlocal degraded_seen
                degraded_seen = max(degraded_seen, _degraded(server.url))
                return _degraded(server.url) == 0 and load.ok() >= ok_at_move + 40

            ok_at_move = load.ok()
            try:
                wait_for("the gateway on the new primary", recovered, timeout=40)
            except AssertionError as e:
                # Seen once in a full suite run (2026-12-07): 401s after the failover, the
                # key's record not found where the gateway read it. Say where it is.
                where = {}
                for node in (first, second):
                    with node.client() as r:
                        where[node.port] = (
                            r.info("replication")["role"],
                            r.hexists(f"{PREFIX}:keys", made["id"]),
                        )
                statuses = Counter(status for status, _ in load.results[before:])
                raise AssertionError(f"{e}; (role, key record) by port: {where}; {statuses}") from e
        after = load.results[before:]
        statuses = Counter(status for status, _ in load.results)
        # The outage window was real, and the policy decided what was answered in it.
        assert degraded_seen == 1
        if policy == "closed":
            assert set(statuses) == {200, 503}, statuses
            assert {kind for status, kind in after if status != 200} == {"service_unavailable"}
        else:
            assert set(statuses) == {200}, statuses
        # The gateway follows the new primary without a restart: it runs the scripts now.
        assert _scripts_run(second) > scripts_on_second

        ok = statuses[200]
        deadline = time.monotonic() + 30
        while True:  # the settlements queued during the failover are flushed
            (day,) = settled(server.url, made["id"])["days"].values()
            if day["m"]["requests_full"] == ok or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        queued = len(server.gateway.tenancy._pending)
        assert day["m"]["requests_full"] == ok, (day, statuses, f"{queued} still queued")
        assert day["m"]["completion_tokens"] == 2 * ok
        # Read on the new primary itself, not through the gateway.
        with second.client() as r:
            (key,) = r.keys(f"{PREFIX}:use:{made['id']}:*")
            assert int(r.hget(key, "m\x1frequests_full") or 0) == ok
        # A settlement sent again under its id (as after an unconfirmed attempt) is
        # written once, and each is confirmed by the replica (WAIT) before it counts.
        target = RedisTarget("redis://mymaster/0", sentinels=((("127.0.0.1", sentinel.port)),))

        async def twice() -> None:
            store = RedisStore(target, PREFIX, timeout_s=1.0)
            once = Usage("m", 0, 1, 1, "full", release=False, once="test-epoch/7")
            try:
                for _ in range(2):
                    await store.settle(made["id"], Limits(), once, "2026-01-01")
            finally:
                await store.close()

        asyncio.run(twice())
        with second.client() as r:
            assert r.hget(f"{PREFIX}:use:{made['id']}:2026-01-01", "m\x1frequests_full") == "1"
            assert r.getbit(f"{PREFIX}:once:test-epoch", 7) == 1
    finally:
        if server is not None:
            server.stop()
        for node in reversed(nodes):
            node.stop()


def test_resp_client_follows_the_primary_it_is_told(tmp_path: Path) -> None:
    """The hot-path client alone, its resolver standing in for the sentinels: a node
    that is not the primary is refused at the handshake (ROLE), and a primary demoted
    under an open connection (READONLY) retires that connection, so the next call
    reaches the primary the resolver names then."""
    from gateway.state_store import StoreUnavailable
    from gateway.state_store.resp import ReplyError, RespClient, encode

    a = RedisNode(tmp_path, *FAST_SYNC).start()
    b = RedisNode(tmp_path, *FAST_SYNC, "--replicaof", "127.0.0.1", str(a.port)).start()
    named = [b.port]  # where the "sentinels" say the primary is
    write = encode("EVAL", "return redis.call('INCR', KEYS[1])", 1, "n")

    async def resolve() -> tuple[str, int]:
        return "127.0.0.1", named[0]

    async def run() -> None:
        client = RespClient(a.url, 2.0, resolve)
        try:
            with pytest.raises(StoreUnavailable, match="not the primary"):
                await client.call(write)
            named[0] = a.port
            assert await client.call(write) == 1
            wait_for("the write replicated", lambda: b.client().get("n") == "1")
            # A failover: b promoted, a made its replica, the open connection kept.
            with b.client() as r:
                r.execute_command("REPLICAOF", "NO", "ONE")
            with a.client() as r:
                r.execute_command("REPLICAOF", "127.0.0.1", str(b.port))
            reply = await client.call(write)
            assert isinstance(reply, ReplyError) and str(reply).startswith("READONLY")
            named[0] = b.port
            assert await client.call(write) == 2  # b had a's write, and took this one
        finally:
            await client.close()

    try:
        wait_for("the replica in sync", lambda: b.client().get("missing") is None and
                 b.client().info("replication")["master_link_status"] == "up")  # fmt: skip
        asyncio.run(run())
    finally:
        b.stop()
        a.stop()
