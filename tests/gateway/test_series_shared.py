"""The status page's series shared by the front doors: `gateway serve --workers 2` with
Redis, requests spread over both front doors (a new connection each), and
`GET /status/series` from either front door counts every request once, from both rings
(`gateway.series`: each front door publishes its buckets to the state store).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import ADMIN_KEY
from tests.gateway.procs import SHARED_REDIS, GatewayProcess, clean_prefix, new_prefix
from tests.gateway.test_api_sim import SimThread

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
N = 40
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def test_series_add_up_over_front_doors(sims: SimThread, tmp_path: Path) -> None:
    worker = sims.start(model="m", output_tokens=3)
    prefix = new_prefix()
    gw = GatewayProcess(
        [{"name": "m", "engine": "openai", "endpoints": [worker.url]}],
        tmp_path,
        ("--workers", "2"),
        GATEWAY_REDIS_URL=SHARED_REDIS,
        GATEWAY_REDIS_PREFIX=prefix,
        GATEWAY_REDIS_TIMEOUT_MS="1000",
    )
    try:
        gw.wait_ready()
        # With Redis, keys are hashed: one made by the admin API.
        made = httpx.post(f"{gw.url}/admin/keys", json={"name": "series"}, headers=ADMIN)
        auth = {"authorization": f"Bearer {made.json()['key']}"}
        for _ in range(N):  # a new connection each: the kernel spreads them over both
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=auth)
            assert r.status_code == 200
        views = []
        deadline = time.monotonic() + 60
        while True:
            s = httpx.get(f"{gw.url}/status/series", headers=auth).json()
            total = sum(s["models"].get("m", {}).get("requests", []))
            views.append((s["fronts"], total))
            if views[-4:] == [(2, N)] * 4:  # four answers in a row, from either front door
                break
            assert time.monotonic() < deadline, views[-10:]
            time.sleep(0.5)
        assert sum(s["all"]["requests"]) == N
        assert sum(s["models"]["m"]["completion_tokens_s"]) > 0
        assert s["bucket_s"] == 10 and len(s["all"]["requests"]) == 90
    finally:
        gw.stop()
        sims.call(worker.stop())
        clean_prefix(prefix)
