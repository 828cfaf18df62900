"""The tenants' metrics and their Grafana panels: tokens and 429s per API key id (never the
key), bounded by the keys issued.

Proves, against a gateway with hashed keys (a keys file) in front of a simulator worker:
`gateway_key_tokens_total{key_id,kind}` counts what the usage ledger bills per key,
`gateway_key_rate_limited_total{key_id,reason}` counts a key's 429s by the limit that
refused them, no key's secret appears in /metrics, and every expression of the
dashboard's tenants and failure-handling panels names only metrics /metrics exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, start_gateway
from tests.gateway.test_api_sim import SimThread
from tests.gateway.test_openapi_cors import DASHBOARD, _exported

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _samples(text: str, name: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                labels = tuple(v for k, v in sorted(s.labels.items()))
                out[labels] = s.value  # type: ignore[index]
    return out  # type: ignore[return-value]


def test_tokens_and_429s_per_key_and_the_dashboard_panels(sims: SimThread, tmp_path: Path) -> None:
    worker = sims.start(model="m", output_tokens=4)
    gw = start_gateway(
        [{"name": "m", "engine": "openai", "endpoints": [worker.url]}],
        tmp_path,
        keys_file=tmp_path / "keys.json",
    )
    try:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        wide = httpx.post(f"{gw.url}/admin/keys", json={"name": "wide"}, headers=admin).json()
        tight = httpx.post(
            f"{gw.url}/admin/keys", json={"name": "tight", "rpm": 1}, headers=admin
        ).json()
        for _ in range(3):
            r = httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {wide['key']}"},
            )
            assert r.status_code == 200
        statuses = [
            httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {tight['key']}"},
            ).status_code
            for _ in range(3)
        ]
        assert statuses[0] == 200 and statuses.count(429) == 2
        ledger = httpx.get(f"{gw.url}/admin/keys/{wide['id']}/usage", headers=admin).json()
        text = httpx.get(f"{gw.url}/metrics").text
    finally:
        gw.stop()
        sims.call(worker.stop())

    tokens = _samples(text, "gateway_key_tokens_total")
    (day,) = ledger["days"].values()
    billed = day["m"]
    assert tokens[(wide["id"], "completion")] == billed["completion_tokens"] == 12
    assert tokens[(wide["id"], "prompt")] == billed["prompt_tokens"] > 0
    assert tokens[(tight["id"], "completion")] == 4
    limited = _samples(text, "gateway_key_rate_limited_total")
    assert limited == {(tight["id"], "requests"): 2.0}
    for made in (wide, tight):
        secret = made["key"].split(".", 1)[1]
        assert secret not in text

    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for title in (
        "Top keys by tokens",
        "429s by reason",
        "Top keys by 429s",
        "Continuations, retries and ejections",
    ):
        assert title in titles
    exported = _exported(text)
    tenants = [
        t["expr"]
        for p in dashboard["panels"]
        if p["type"] != "row" and p["gridPos"]["y"] in range(44, 62)
        for t in p["targets"]
    ]
    assert len(tenants) >= 7
    for expr in tenants:
        names = re.findall(r"\b((?:gateway|process)_[a-z_]+)", expr)
        assert names and all(n in exported for n in names), expr
    assert any("gateway_key_tokens_total" in e for e in tenants)
    assert any("continuations" in e and "gateway_engine_events_total" in e for e in tenants)
