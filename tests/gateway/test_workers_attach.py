"""`gateway serve --workers 2` with a launched engine: the control process launches and
supervises the workers (a stand-in `vllm` program that runs the simulator), and the front
doors attach to the workers' URLs directly, so the control process is off the data path.

Proves: every front door lists the workers' own URLs (not the control's port) and serves
through them, streamed and not; a worker killed with SIGKILL is restarted by the control on
the same port while the front doors keep answering (retried before the first byte)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY
from tests.engines.launch.test_vllm import FAKE_VLLM
from tests.gateway.procs import REPO, GatewayProcess, fake_adapter

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def launched(tmp_path: Path) -> Iterator[dict[str, Any]]:
    program = tmp_path / "fake_vllm.py"
    program.write_text(FAKE_VLLM)
    record = tmp_path / "record"
    record.mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    models = [
        {
            "name": "smol",
            "engine": "vllm",
            "model": str(tmp_path / "ckpt"),
            "replicas": 2,
            "options": {
                "command": [sys.executable, str(program)],
                "env": {"FAKE_VLLM_RECORD": str(record), "PYTHONPATH": str(REPO)},
                "restart_backoff_s": 0.1,
                "health_interval_s": 0.2,
            },
        }
    ]
    gw = GatewayProcess(models, tmp_path, ("--workers", "2"))
    try:
        yield {"gw": gw.wait_ready(timeout=180), "record": record}
    finally:
        gw.stop()


def _worker_urls(gw_url: str) -> list[str]:
    r = httpx.get(f"{gw_url}/health", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return [w["url"] for w in r.json()["models"]["smol"]["workers"]["list"]]


def test_front_doors_attach_to_launched_workers(launched: dict[str, Any]) -> None:
    gw: GatewayProcess = launched["gw"]
    ports = sorted(p.stem for p in launched["record"].glob("*.json"))
    assert len(ports) == 2
    workers = sorted(f"http://127.0.0.1:{p}" for p in ports)
    # Every front door (new connections spread over both) attaches to the workers.
    for _ in range(6):
        assert sorted(_worker_urls(gw.url)) == workers

    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        r = c.chat.completions.create(model="smol", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        assert r.usage is not None and r.usage.completion_tokens == 3
        text = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(
                model="smol",
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=3,
                stream=True,
            )
            if ch.choices
        )
        assert text == r.choices[0].message.content

    # Kill one worker: the control restarts it on the same port; meanwhile the front doors
    # retry on the other worker, so no request fails.
    victim = _listener_pid(int(ports[0]))
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    answered = 0
    deadline = time.monotonic() + 60
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        while True:
            r = c.chat.completions.create(model="smol", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
            answered += 1
            restarted = _listener_pid(int(ports[0]))
            if restarted is not None and restarted != victim and answered >= 10:
                break
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.05)
    # Back on the same URL, and healthy again in the front doors' view.
    deadline = time.monotonic() + 30
    while True:
        r2 = httpx.get(f"{gw.url}/health", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        if r2.status_code == 200 and r2.json()["models"]["smol"]["workers"]["healthy"] == 2:
            break
        assert time.monotonic() < deadline, r2.text
        time.sleep(0.2)
    assert sorted(_worker_urls(gw.url)) == workers


def _listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:`port` (from /proc, no tools)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return int(pid)
    return None


def test_adapter_loaded_through_one_front_door_is_placed_by_all(tmp_path: Path) -> None:
    """LoRA affinity (adapters placed on demand) behind two front doors sharing Redis: an
    adapter loaded through one front door is served by both; the other one places it on a
    worker that lacks it at its first request (seen on the H200: it answered 404)."""
    import subprocess

    from tests.gateway.procs import SHARED_REDIS, clean_prefix, new_prefix
    from tests.gateway.test_tenancy import create_key

    root = tmp_path / "loras"
    fake_adapter(root)
    sims, urls = [], []
    for _ in range(2):
        port = _free()
        sims.append(
            subprocess.Popen(
                [sys.executable, "-m", "simulator", "--port", str(port), "--model", "m"],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    models = [
        {
            "name": "m",
            "engine": "openai",
            "endpoints": urls,
            "lora": {"max_adapters": 2, "roots": [str(root)]},
            "routing": {"scorers": {"lora_affinity": 2, "least_outstanding": 1}},
            "options": {"health_interval_s": 0.2},
        }
    ]
    prefix = new_prefix()
    gw = GatewayProcess(
        models,
        tmp_path,
        ("--workers", "2"),
        GATEWAY_REDIS_URL=SHARED_REDIS,
        GATEWAY_REDIS_PREFIX=prefix,
    )
    try:
        gw.wait_ready(timeout=120)
        key = create_key(gw.url)["key"]
        r = httpx.post(
            f"{gw.url}/v1/load_lora_adapter",
            json={"lora_name": "a1", "lora_path": str(root / "a1")},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert r.status_code == 200, r.text
        served = 0
        deadline = time.monotonic() + 60
        while served < 20:  # 20 in a row on new connections (both front doors)
            with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0) as c:
                try:
                    c.chat.completions.create(model="a1", messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
                    served += 1
                except openai.NotFoundError:
                    served = 0  # the other front door has not read the store yet
                    assert time.monotonic() < deadline, "a1 not served by both front doors"
                    time.sleep(0.2)
        # It was placed on demand: some worker holds it now.
        held = [httpx.get(f"{u}/v1/models").json()["data"] for u in urls]
        assert any(m["id"] == "a1" for data in held for m in data)
    finally:
        gw.stop()
        clean_prefix(prefix)
        for p in sims:
            p.terminate()
            p.wait(timeout=10)


def _free() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
