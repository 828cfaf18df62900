"""`gateway serve --workers 2` over its lifetime, as an operator runs it (a simulator model
owned by the control process, the real Redis under an own prefix, an admin port): admin
routes only on the admin port; the control process killed with SIGKILL is restarted by the
parent while front doors answer 503 + Retry-After, and serves again with its adapter
re-applied; a revocation is seen by every front door at the next request; SIGTERM drains
every front door (streams in flight finish, new requests in the accept window are
answered), then stops the control process."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, free_port
from tests.gateway.procs import (
    SHARED_REDIS,
    GatewayProcess,
    clean_prefix,
    descendants,
    fake_adapter,
    new_prefix,
)
from tests.gateway.test_tenancy import CHAT
from tests.gateway.test_workers import _alive, _cmdline

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
STREAMS = 8


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    prefix = new_prefix()
    root = tmp_path / "loras"
    fake_adapter(root)
    models = [
        {
            "name": "m",
            "engine": "sim",
            "options": {"itl_ms": 20},
            "lora": {"max_adapters": 2, "roots": [str(root)]},
        }
    ]
    admin_port = free_port()
    env = {
        "GATEWAY_REDIS_URL": SHARED_REDIS,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_ADMIN_PORT": str(admin_port),
        "GATEWAY_DRAIN_ACCEPT_S": "4",
        "GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "2000",
    }
    gw = GatewayProcess(models, tmp_path, ("--workers", "2"), **env)
    try:
        yield {
            "gw": gw.wait_ready(timeout=180),
            "admin": f"http://127.0.0.1:{admin_port}",
            "root": root,
        }
    finally:
        gw.stop()
        clean_prefix(prefix)


KEY: dict[str, str] = {}


def _chat(url: str, model: str = "m", max_tokens: int = 2) -> httpx.Response:
    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=KEY, timeout=30)


def _control(gw: GatewayProcess) -> int:
    (pid,) = [p for p in descendants(gw.proc.pid) if b"--workers\x001\x00" in _cmdline(p)]
    return pid


def test_admin_port_restart_and_drain(fleet: dict[str, Any]) -> None:
    gw: GatewayProcess = fleet["gw"]
    admin: str = fleet["admin"]

    # 1. The admin routes live on the admin port only, still behind the admin key.
    r = httpx.post(f"{gw.url}/admin/keys", json={}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Unknown path /admin/keys."
    load = {"lora_name": "a1", "lora_path": str(fleet["root"] / "a1")}
    assert httpx.post(f"{gw.url}/v1/load_lora_adapter", json=load, headers=ADMIN).status_code == 404
    assert httpx.post(f"{admin}/admin/keys", json={}).status_code == 401
    made = httpx.post(f"{admin}/admin/keys", json={}, headers=ADMIN)
    assert made.status_code == 201
    KEY["authorization"] = f"Bearer {made.json()['key']}"
    assert _chat(admin).status_code == 404  # the API is not served on the admin port
    r = httpx.post(f"{admin}/v1/load_lora_adapter", json=load, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    ok = 0
    while ok < 10:  # ten in a row on new connections: both front doors serve a1
        r = _chat(gw.url, "a1")
        ok = ok + 1 if r.status_code == 200 else 0
        if not ok:  # the other front door follows the store each second
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)

    # 2. The control process dies: 503 + Retry-After meanwhile, then served again.
    old = _control(gw)
    os.kill(old, signal.SIGKILL)
    seen: Counter[int] = Counter()
    in_a_row = 0
    deadline = time.monotonic() + 120
    while in_a_row < 10:
        assert time.monotonic() < deadline, (seen, gw.log.read_text()[-3000:])
        r = _chat(gw.url, "a1")
        seen[r.status_code] += 1
        if r.status_code == 200:
            in_a_row += 1 if seen[503] else 0
            continue
        in_a_row = 0
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["type"] and err["message"] and "code" in err
        time.sleep(0.1)
    assert seen[503] >= 1 and set(seen) == {200, 503}, seen
    assert _control(gw) != old
    log = gw.log.read_text()
    assert "restarting it in 1 s (restart 1)" in log and "is back on" in log
    assert "adapter 'a1' re-applied to the control process at its start" in log

    # A revocation through the admin port takes effect at the very next request on every
    # front door, though each had the key's record cached (the admission script's version).
    other = httpx.post(f"{admin}/admin/keys", json={}, headers=ADMIN).json()
    bearer = {"authorization": f"Bearer {other['key']}"}
    body = {"model": "m", "messages": CHAT, "max_tokens": 1}
    for _ in range(10):  # new connections: both front doors cache the record
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=bearer)
        assert r.status_code == 200, r.text
    assert httpx.delete(f"{admin}/admin/keys/{other['id']}", headers=ADMIN).status_code == 200
    for _ in range(10):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=bearer)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["message"] == "This API key has been revoked."

    # 3. SIGTERM: streams in flight finish on every front door, requests in the accept
    # window are answered (200 or 503 + Retry-After), never refused.
    started = threading.Barrier(STREAMS + 1)
    ends: list[str] = []

    def stream() -> None:
        body = {"model": "m", "messages": CHAT, "max_tokens": 150, "stream": True}
        url = f"{gw.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=KEY, timeout=60) as s:
            lines = s.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    break
            started.wait()
            last = ""
            for line in lines:
                if line.startswith("data:"):
                    last = line
            ends.append(last)

    threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    procs = descendants(gw.proc.pid)
    gw.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.url}/health/ready").status_code == 200:  # readiness goes 503
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answered: Counter[int] = Counter()
    for _ in range(10):  # well inside the 4 s accept window
        r = _chat(gw.url)
        answered[r.status_code] += 1
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
    assert sum(answered.values()) == 10 and set(answered) <= {200, 503}, answered
    for t in threads:
        t.join(timeout=60)
    assert ends == ["data: [DONE]"] * STREAMS  # none cut
    assert gw.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 15
    while [p for p in procs if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in procs if _alive(p)]


def test_admin_port_in_one_process(tmp_path: Path) -> None:
    """One process (no --workers), keys file mode: the admin socket is a second listener
    of the same process; the public port answers the admin routes with 404."""
    admin_port = free_port()
    env = {"GATEWAY_ADMIN_PORT": str(admin_port), "GATEWAY_KEYS_FILE": str(tmp_path / "k.json")}
    gw = GatewayProcess([{"name": "m", "engine": "sim"}], tmp_path, **env).wait_ready()
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        assert httpx.get(f"{gw.url}/admin/keys", headers=ADMIN).status_code == 404
        assert httpx.get(f"{admin}/admin/keys").status_code == 401
        made = httpx.post(f"{admin}/admin/keys", json={"rpm": 100}, headers=ADMIN)
        assert made.status_code == 201, made.text
        key = {"authorization": f"Bearer {made.json()['key']}"}
        body = {"model": "m", "messages": CHAT, "max_tokens": 1}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=key)
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "100"
        r = httpx.post(f"{admin}/v1/chat/completions", json=body, headers=key)
        assert r.status_code == 404
    finally:
        gw.stop()  # one process: uvicorn re-raises SIGTERM after its shutdown (status -15)
