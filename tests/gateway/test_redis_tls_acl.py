"""Managed-Redis connections against redis-servers of the test's own: TLS only (no
plaintext port, client certificates required, a throwaway CA made with openssl) and an
ACL user confined to the gateway's key prefix. Both clients of the store are exercised:
the pipelined RESP client (the admit/settle scripts) and redis-py (keys, usage), through
a gateway configured only by its `GATEWAY_REDIS_*` settings and driven with the `openai`
SDK; wrong trust, a missing client certificate, a wrong password and a key outside the
user's pattern are each refused as the store being unavailable. Last, Sentinel over TLS:
a primary, its replica and a sentinel, all TLS only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.settings import SettingsError, load_settings
from gateway.state_store import Limits, StoreUnavailable
from gateway.state_store.redis import RedisStore
from gateway.state_store.target import RedisTarget, parse_sentinels
from tests.conftest import start_gateway
from tests.gateway.redis_procs import Certs, RedisNode, SentinelNode, wait_for
from tests.gateway.test_api_sim import SimThread
from tests.gateway.test_tenancy import CHAT, create_key, settled

PREFIX = "gwacl"


@pytest.fixture(scope="module")
def models(sims: SimThread) -> Iterator[list[dict[str, Any]]]:
    sim = sims.start(model="m", itl_ms=1)
    yield [{"name": "m", "engine": "openai", "endpoints": [sim.url]}]
    sims.call(sim.stop())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_node(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisNode]:
    node = RedisNode(tmp_path_factory.mktemp("tls"), certs=certs).start()
    yield node
    node.stop()


def _round_trip(target: RedisTarget) -> tuple[bool, dict[str, dict[str, int]]]:
    """One admission (RESP client), one settlement, the ledger read back (redis-py)."""
    from gateway.state_store import Usage

    async def run() -> tuple[bool, dict[str, dict[str, int]]]:
        store = RedisStore(target, PREFIX, timeout_s=2.0)
        try:
            await store.start()
            d = await store.admit("k1", Limits(rpm=10), 5, 0.0)
            # With an id: behind Sentinel the settlement is also confirmed by the replica.
            spent = Usage("m", 5, 2, 3, "full", once="rt/1")
            await store.settle("k1", Limits(rpm=10), spent, "2026-01-01")
            return d.admitted, await store.usage("k1")
        finally:
            await store.close()

    return asyncio.run(run())


def _refused(target: RedisTarget) -> str:
    """What the store says when it cannot get in, for both of its clients."""

    async def run() -> str:
        store = RedisStore(target, PREFIX, timeout_s=2.0)
        try:
            with pytest.raises(StoreUnavailable) as cold:
                await store.start()  # redis-py
            with pytest.raises(StoreUnavailable) as hot:
                await store.admit("k1", Limits(rpm=10), 1, 0.0)  # the RESP client
            return f"{cold.value} | {hot.value}"
        finally:
            await store.close()

    return asyncio.run(run())


def test_tls_with_client_certificate_both_clients(tls_node: RedisNode, certs: Certs) -> None:
    ok = RedisTarget(
        tls_node.url,
        tls_ca=str(certs.ca),
        tls_cert=str(certs.client_cert),
        tls_key=str(certs.client_key),
    )
    admitted, ledger = _round_trip(ok)
    assert admitted
    assert ledger == {"2026-01-01": {"m\x1fprompt_tokens": 2, "m\x1fcompletion_tokens": 3,
                                     "m\x1frequests_full": 1}}  # fmt: skip
    # The name in the certificate is checked: localhost is in it as well as 127.0.0.1.
    by_name = RedisTarget(
        f"rediss://localhost:{tls_node.port}/0",
        tls_ca=str(certs.ca),
        tls_cert=str(certs.client_cert),
        tls_key=str(certs.client_key),
    )
    assert _round_trip(by_name)[0]
    # The server was started with no plaintext port: all of that went over TLS. Refused:
    # a CA that did not sign the server's certificate, and no client certificate.
    wrong_ca = RedisTarget(
        tls_node.url,
        tls_ca=str(certs.other_ca),
        tls_cert=str(certs.client_cert),
        tls_key=str(certs.client_key),
    )
    assert "CERTIFICATE_VERIFY_FAILED" in _refused(wrong_ca).upper().replace(" ", "_")
    _refused(RedisTarget(tls_node.url, tls_ca=str(certs.ca)))
    with tls_node.client() as r:
        r.delete(*r.keys(f"{PREFIX}:*"))


def test_gateway_over_tls_as_an_acl_user(
    tls_node: RedisNode, certs: Certs, models: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A managed service's shape: TLS and a user of its own that may touch only the
    gateway's keys, the password given in its own setting, not in the URL."""
    with tls_node.client() as r:
        r.execute_command("ACL", "SETUSER", "gateway", "on", ">s3cret/pw", f"~{PREFIX}:*",
                          "+@all", "-@dangerous")  # fmt: skip
    server = start_gateway(
        models,
        tmp_path,
        redis_url=f"rediss://gateway@127.0.0.1:{tls_node.port}/0",
        redis_password="s3cret/pw",
        redis_tls_ca=str(certs.ca),
        redis_tls_cert=str(certs.client_cert),
        redis_tls_key=str(certs.client_key),
        redis_prefix=PREFIX,
        redis_timeout_ms=1000,
    )
    try:
        made = create_key(server.url, rpm=2)
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=made["key"], max_retries=0) as c:
            for _ in range(2):
                r = c.chat.completions.create(model="m", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
                assert r.usage is not None and r.usage.completion_tokens == 3
            with pytest.raises(openai.RateLimitError):  # the limiter in Redis decided
                c.chat.completions.create(model="m", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        (day,) = settled(server.url, made["id"])["days"].values()
        assert day["m"]["requests_full"] == 2 and day["m"]["completion_tokens"] == 6
        with tls_node.client() as r:
            users = {c["user"] for c in r.client_list()}
        assert "gateway" in users  # the gateway's connections are the ACL user's
    finally:
        server.stop()
        with tls_node.client() as r:
            r.delete(*r.keys(f"{PREFIX}:*"))


def test_acl_user_in_the_url_and_refusals(tmp_path: Path) -> None:
    node = RedisNode(tmp_path).start()
    try:
        with node.client() as r:
            r.execute_command("ACL", "SETUSER", "gw", "on", ">pw:1@", f"~{PREFIX}:*", "+@all")
            r.execute_command("ACL", "SETUSER", "other", "on", ">pw", "~elsewhere:*", "+@all")
            # No anonymous access: the default user is switched off (this client stays in).
            r.execute_command("ACL", "SETUSER", "default", "off")
        # Special characters are percent-encoded in the URL, as in any URL.
        url = f"redis://gw:pw%3A1%40@{node.address}/0"
        assert _round_trip(RedisTarget(url))[0]
        # The same user from the settings instead of the URL.
        bare = f"redis://{node.address}/0"
        assert _round_trip(RedisTarget(bare, username="gw", password="pw:1@"))[0]
        assert "WRONGPASS" in _refused(RedisTarget(bare, username="gw", password="nope"))
        # Without a user: refused by both clients (redis-py's HELLO, the scripts' call).
        assert _refused(RedisTarget(bare)).lower().count("authenticated") == 2
        # A user whose key pattern does not cover the gateway's prefix gets in but may
        # not decide: the script's key is refused (NOPERM), the store is unavailable.

        async def outside() -> str:
            store = RedisStore(RedisTarget(bare, username="other", password="pw"), PREFIX, 2.0)
            try:
                await store.start()  # PING needs no key
                with pytest.raises(StoreUnavailable) as e:
                    await store.admit("k1", Limits(rpm=10), 1, 0.0)
                return str(e.value)
            finally:
                await store.close()

        assert "NOPERM" in asyncio.run(outside())
    finally:
        node.stop()


def test_sentinel_over_tls(certs: Certs, tmp_path: Path) -> None:
    """Managed HA's shape: data nodes and the sentinel all TLS only; the store finds the
    primary through the sentinel over TLS and reaches it over TLS (both clients)."""
    tls_repl = ("--tls-replication", "yes", "--tls-client-cert-file", str(certs.client_cert),
                "--tls-client-key-file", str(certs.client_key),
                "--repl-diskless-sync-delay", "0")  # fmt: skip
    primary = RedisNode(tmp_path, *tls_repl, certs=certs).start()
    nodes: list[Any] = [primary]
    try:
        replica = RedisNode(
            tmp_path, *tls_repl, "--replicaof", "127.0.0.1", str(primary.port), certs=certs
        ).start()
        nodes.append(replica)
        wait_for("the replica in sync over TLS", lambda: replica.client().info("replication")
                 ["master_link_status"] == "up")  # fmt: skip
        sentinel = SentinelNode(tmp_path, primary, certs=certs).start()
        nodes.append(sentinel)
        wait_for("the sentinel to see the replica", lambda: sentinel.replicas_seen() >= 1)
        target = RedisTarget(
            "rediss://mymaster/0",
            tls_ca=str(certs.ca),
            tls_cert=str(certs.client_cert),
            tls_key=str(certs.client_key),
            sentinels=(("127.0.0.1", sentinel.port),),
        )
        admitted, ledger = _round_trip(target)
        assert admitted and ledger["2026-01-01"]["m\x1frequests_full"] == 1
        with replica.client() as r:  # replicated, and confirmed by WAIT before it counted
            assert r.hget(f"{PREFIX}:use:k1:2026-01-01", "m\x1frequests_full") == "1"
    finally:
        for node in reversed(nodes):
            node.stop()


def test_target_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="rediss://"):
        RedisTarget("redis://h/0", tls_ca="/ca.pem")
    with pytest.raises(ValueError, match="together"):
        RedisTarget("rediss://h/0", tls_cert="/c.pem")
    with pytest.raises(ValueError, match="scheme"):
        RedisTarget("http://h/0")
    assert parse_sentinels(" a:1, b ,[::1]:5") == (("a", 1), ("b", 26379), ("::1", 5))
    # The same checks when the gateway starts: one line naming the variables.
    for bad, says in (
        ({"redis_url": "redis://h/0", "redis_tls_ca": "/ca.pem"}, "must be rediss://"),
        ({"redis_sentinels": "h:26379"}, "set GATEWAY_REDIS_URL too"),
    ):
        with pytest.raises(SettingsError) as e:
            load_settings(**bad)
        (line,) = e.value.lines
        assert says in line and line.startswith("GATEWAY_REDIS_")
    t = RedisTarget("redis://u:p%40@h:7/3", password="override")
    assert (t.host, t.port, t.db, t.user, t.secret) == ("h", 7, 3, "u", "override")
