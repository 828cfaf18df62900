"""Drain on SIGTERM through a real `gateway serve` process: readiness goes 503 at once, the
listener keeps accepting for GATEWAY_DRAIN_ACCEPT_S, and streams in flight finish (0 cut)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import REPO, free_port


def _stream(url: str, out: list[str], started: threading.Semaphore) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 120,
        "stream": True,
    }
    parts = []
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as r:
        for chunk in r.iter_bytes():
            if not parts:
                started.release()  # this stream is in flight
            parts.append(chunk)
    out.append(b"".join(parts).decode())


def test_sigterm_drains_streams_and_keeps_accepting(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "models.yaml"
    config.write_text(
        yaml.safe_dump({"models": [{"name": "m", "engine": "sim", "options": {"itl_ms": 25}}]})
    )
    env = {
        **os.environ,
        "GATEWAY_DRAIN_ACCEPT_S": "1.5",
        "GATEWAY_DRAIN_SECONDS": "30",
        "GATEWAY_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("gateway did not become ready")
        results: list[str] = []
        started = threading.Semaphore(0)
        url = f"{base}/v1/chat/completions"
        threads = [threading.Thread(target=_stream, args=(url, results, started)) for _ in range(8)]
        for t in threads:
            t.start()
        for _ in range(8):  # every stream has its first bytes (120 tokens × 25 ms each)
            assert started.acquire(timeout=30)
        proc.send_signal(signal.SIGTERM)
        # Readiness goes 503 while the listener still accepts and serves.
        codes = []
        for _ in range(100):
            codes.append(httpx.get(f"{base}/health/ready").status_code)
            if codes[-1] == 503:
                break
            time.sleep(0.01)
        assert codes[-1] == 503
        late = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert late.status_code == 200
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 8
        for text in results:
            assert text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in text
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate()
        print(out.decode()[-2000:])
