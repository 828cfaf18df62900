"""The status page's charts and keys view in a real browser (Debian's Chromium through
Playwright, as tests/gateway/test_ui_browser.py), against a gateway in front of simulator
workers with hashed keys (a keys file) and the admin key, under load from a background
client.

Proves: the live charts (`/status/series`) draw lines from the load — requests, errors and
429s, end-to-end and TTFT percentiles, tokens, in flight — and the per-worker bars show;
with the admin key entered the keys view lists the keys, creates one with limits and shows
its secret once (the secret works, then revoking it stops it), and draws a key's usage
from the ledger; every request the page makes goes to the gateway's own origin. The
screenshots are kept as artifacts (artifacts/ui-charts.png, artifacts/ui-keys.png, paths
printed) for a person to look at.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import ADMIN_KEY, REPO, ServerThread, start_gateway
from tests.gateway.test_api_sim import SimThread
from tests.gateway.test_ui_browser import _chromium

ARTIFACTS = REPO / "artifacts"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


class Load:
    """A few client threads sending chat requests (streamed and not, to both models, some
    over a tight per-minute limit) until stopped."""

    def __init__(self, url: str, keys: list[str]):
        self.url = url
        self.keys = keys
        self.stop = threading.Event()
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {
                    "model": "m" if (n + i) % 3 else "small",
                    "messages": CHAT,
                    "max_tokens": 12,
                    "stream": n % 2 == 0,
                }
                key = self.keys[(n + i) % len(self.keys)]
                r = c.post(
                    "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                )
                r.read()
                self.sent += 1
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                time.sleep(0.02)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture(scope="module")
def gateway(sims: SimThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workers = [sims.start(model="m", ttft_ms=30, itl_ms=4, output_tokens=40) for _ in range(2)]
    small = sims.start(model="small", ttft_ms=10, itl_ms=2, output_tokens=40)
    tmp = tmp_path_factory.mktemp("ui-charts")
    models = [
        {"name": "m", "engine": "openai", "endpoints": [w.url for w in workers]},
        {"name": "small", "engine": "openai", "endpoints": [small.url]},
    ]
    gw = start_gateway(models, tmp, keys_file=tmp / "keys.json")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    made = [
        httpx.post(f"{gw.url}/admin/keys", json=policy, headers=admin).json()
        for policy in ({"name": "load", "tpm": 10_000_000}, {"name": "tight", "rpm": 30})
    ]
    yield {"gw": gw, "keys": made, "workers": workers}
    gw.stop()
    for s in (*workers, small):
        sims.call(s.stop())


def _keep(page: Page, tmp: Path, name: str) -> Path:
    shot = tmp / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    print(f"screenshot: {ARTIFACTS / name}")
    assert shot.stat().st_size > 20_000
    return ARTIFACTS / name


def _points(page: Page, chart: str) -> int:
    return int(page.locator(f"#{chart}").get_attribute("data-points") or 0)


def test_live_charts_under_load_and_the_keys_view(gateway: dict[str, Any], tmp_path: Path) -> None:
    gw: ServerThread = gateway["gw"]
    load_key, tight_key = (k["key"] for k in gateway["keys"])
    seen: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p, Load(gw.url, [load_key, load_key, tight_key]) as load:
        browser = p.chromium.launch(
            executable_path=_chromium(), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1320, "height": 1200})
            page.on("request", lambda r: seen.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{gw.url}/ui/")
            expect(page.locator("#conn")).to_have_text("enter the API key", timeout=10_000)
            page.fill("#key", load_key)
            page.click("#key-form button")
            expect(page.locator("#conn")).to_have_text("2 / 2 models ready", timeout=10_000)

            # Three 10-second buckets with requests in them: lines, not dots.
            deadline = time.monotonic() + 120
            while _points(page, "chart-rate") < 3 or _points(page, "chart-ttft") < 3:
                assert time.monotonic() < deadline, page.locator("#charts").inner_html()[:2000]
                page.wait_for_timeout(1000)
            for chart in ("chart-e2e", "chart-tokens", "chart-models"):
                assert _points(page, chart) >= 2, chart
            assert page.locator("#chart-rate path.line").count() >= 2  # requests and 429s
            assert page.locator("#chart-models path.line").count() == 2  # one per model
            # Per-worker bars: three workers, the in-flight bars drawn.
            expect(page.locator("#workers tbody tr")).to_have_count(3)
            assert page.locator("#workers .bar span").count() >= 9
            # The model selector narrows every chart to one model.
            page.select_option("#chart-model", "small")
            page.wait_for_function("document.querySelector('#chart-models path.line') !== null")
            page.select_option("#chart-model", "")
            charts_shot = _keep(page, tmp_path, "ui-charts.png")

            # The keys view, with the admin key (kept for this tab only).
            expect(page.locator("#keys-section")).to_be_hidden()
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#admin-form button")
            rows = page.locator("#keys tbody tr")
            expect(rows).to_have_count(2, timeout=10_000)
            assert page.evaluate("sessionStorage.getItem('gateway-admin-key')") == ADMIN_KEY
            assert page.evaluate("localStorage.getItem('gateway-admin-key')") is None
            page.fill("#new-name", "ui-made")
            page.fill("#new-rpm", "60")
            page.fill("#new-budget", "50000")
            page.click("#create-key button")
            expect(rows).to_have_count(3, timeout=10_000)
            secret = page.locator("#secret-value").inner_text()
            assert secret.startswith("gk-")
            made = rows.filter(has_text="ui-made")
            expect(made).to_contain_text("60 req/min")
            expect(made).to_contain_text("50000 tokens budget")
            r = httpx.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": "small", "messages": CHAT, "max_tokens": 3},
                headers={"authorization": f"Bearer {secret}"},
            )
            assert r.status_code == 200
            # The usage of the load's key: stacked bars by model from the ledger.
            load_id = gateway["keys"][0]["id"]
            page.click(f"button[data-usage='{load_id}']")
            expect(page.locator("#usage-key")).to_have_text(load_id)
            page.wait_for_function(
                "Number(document.querySelector('#chart-usage').dataset.bars) >= 2"
            )
            expect(page.locator("#usage-now")).to_contain_text("requests")
            keys_shot = _keep(page, tmp_path, "ui-keys.png")

            # The secret was shown once: hidden, it is gone from the page.
            page.click("#secret-hide")
            expect(page.locator("#secret")).to_be_hidden()
            assert secret not in page.content()
            # Revoke the new key: it stops working.
            page.once("dialog", lambda d: d.accept())
            made_id = made.locator("td").first.inner_text()
            page.click(f"button[data-revoke='{made_id}']")
            expect(rows.filter(has_text="ui-made")).to_contain_text("revoked", timeout=10_000)
            r = httpx.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": "small", "messages": CHAT, "max_tokens": 3},
                headers={"authorization": f"Bearer {secret}"},
            )
            assert r.status_code == 401
        finally:
            browser.close()
    assert load.sent > 50 and load.statuses.get(200, 0) > 40, load.statuses
    assert load.statuses.get(429, 0) > 0, load.statuses  # the tight key's limit showed
    assert errors == []
    # Every request the page made went to the gateway's own origin.
    assert seen and all(u.startswith(gw.url + "/") for u in seen), [
        u for u in seen if not u.startswith(gw.url + "/")
    ]
    assert {charts_shot.name, keys_shot.name} == {"ui-charts.png", "ui-keys.png"}
