"""Total outage over HTTP: the gateway's fast-fail 503 beside its floor, in one run.

    .venv/bin/python bench/outage.py [--calls 2000] [--tree OTHER_CHECKOUT]

Starts two simulator workers that answer every request with 500 (`gateway sim
--error-rate 1`) and `gateway serve` attaching them as one `openai` model with
`eject_after_failures: 1` and a 600 s ejection, each as its own process. Two requests
eject both workers; from then on every request is the fast-fail path (no worker passes the
routing filters: 503 with Retry-After, no I/O to a worker). It then alternates, on one
keep-alive connection from the standard library's `http.client` (the leanest client
here), three requests per round:

    live      GET /health/live (the floor: the front door and the HTTP round trip)
    outage    POST /v1/chat/completions to the ejected model (the fast-fail 503)
    unknown   POST /v1/chat/completions to a model that does not exist (404)

and prints p50 / p99 / max of each and the outage ÷ live ratio. Every answer's status is
checked (and the 503's Retry-After). A benchmark, not a test: on a shared machine read the
ratios measured in the same run. Does not own the fast-fail itself
(`engines.upstream.send`) or the front door (`gateway.app`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(port: int, path: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port}: {path} did not answer in {timeout_s:g} s")
        time.sleep(0.1)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tree", default=str(REPO), help="the checkout whose gateway runs")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(args.tree).resolve())}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            workers = []
            for _ in range(2):
                port = free_port()
                argv = [sys.executable, "-m", "gateway", "sim", "--host", "127.0.0.1",
                        "--port", str(port), "--model", "m", "--error-rate", "1",
                        "--error-status", "500"]  # fmt: skip
                log = open(Path(tmp, f"sim{port}.log"), "wb")  # noqa: SIM115 (lives with the process)
                procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log))
                workers.append(port)
            for port in workers:
                wait_up(port, "/health")
            cfg = Path(tmp, "models.yaml")
            model = {
                "name": "m",
                "engine": "openai",
                "endpoints": [f"http://127.0.0.1:{p}" for p in workers],
                # panic_threshold null: the fast-fail 503, not panic routing to the
                # ejected workers (the default when all are ejected).
                "options": {
                    "eject_after_failures": 1,
                    "eject_base_s": 600,
                    "panic_threshold": None,
                },
            }
            cfg.write_text(json.dumps({"models": [model]}))  # JSON is YAML
            gw = free_port()
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                    "--port", str(gw)]  # fmt: skip
            log = open(Path(tmp, "gateway.log"), "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=tmp))
            wait_up(gw, "/health/live")
            run(gw, args.calls)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


def run(port: int, calls: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    unknown = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})

    def call(method: str, path: str, body: str | None) -> tuple[int, float, str | None]:
        t0 = time.perf_counter_ns()
        conn.request(method, path, body=body, headers=headers if body else {})
        r = conn.getresponse()
        r.read()
        return r.status, (time.perf_counter_ns() - t0) / 1e6, r.getheader("retry-after")

    # Eject both workers (each answers 500 once), then wait for the fast-fail.
    for _ in range(50):
        status, _ms, _ra = call("POST", "/v1/chat/completions", chat)
        if status == 503:
            break
    else:
        raise RuntimeError("the workers were never ejected")
    times: dict[str, list[float]] = {"live": [], "outage": [], "unknown": []}
    for _ in range(calls):
        status, ms, _ra = call("GET", "/health/live", None)
        assert status == 200, status
        times["live"].append(ms)
        status, ms, ra = call("POST", "/v1/chat/completions", chat)
        assert status == 503 and ra is not None and int(ra) >= 1, (status, ra)
        times["outage"].append(ms)
        status, ms, _ra = call("POST", "/v1/chat/completions", unknown)
        assert status == 404, status
        times["unknown"].append(ms)
    print(f"## total outage over HTTP, {calls} rounds (one keep-alive connection)")
    print("request                    p50 ms   p99 ms   max ms")
    for name, xs in times.items():
        print(f"{name:<24} {pct(xs, 0.5):8.3f} {pct(xs, 0.99):8.3f} {max(xs):8.3f}")
    ratio = pct(times["outage"], 0.99) / pct(times["live"], 0.99)
    print(f"outage p99 ÷ live p99: {ratio:.2f}")


if __name__ == "__main__":
    main()
