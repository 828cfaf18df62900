"""The GPU usage check: one API key's ledger against vLLM's own token counters, with 20 % of
the streams cut by their client while vLLM is still generating them. Runs ON the GPU machine
(docs/gpu.md, "Cut streams billed against vLLM's counters"), or here with `--dry-run` (a
simulator worker process with two-token deltas instead of vLLM).

    PYTHONPATH=. python3 bench/gpu_usage.py --out "$OUT" --model /root/smol --deadline EPOCH_S
    .venv/bin/python bench/gpu_usage.py --dry-run --out /tmp/usage

Steps, in order, each bounded by `--deadline`:

1. `vllm serve MODEL` (dry run: `python -m simulator --tokens-per-chunk 2`), waited for on
   /health;
2. `gateway serve` attached to it (`engine: vllm`, `endpoints:`; dry run `engine: openai`)
   with a keys file (keys, limits and the ledger in that process) and an admin key; one key
   created over `POST /admin/keys`;
3. the worker's counters read from its /metrics: `vllm:prompt_tokens_total` +
   `vllm:generation_tokens_total`;
4. `--requests` mixed requests at each `--concurrency` level (a key per level): chat and
   completions, half of the rest streamed; 20 % are streams the client closes after 1–6 chunks, with
   `max_tokens` 64–256 and `ignore_eos` (vLLM's extension) so they are still generating;
   the others ask for 8–32 tokens;
5. the key's usage once settled (nothing in flight, nothing reserved), the counters again:
   drift = (counters − ledger) / counters.

Writes `results.json` (the figures, the outcomes, errors), `worker.log` and `gateway.log`
under --out. Everything it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_procs import (  # noqa: E402
    Spawned,
    attached_config,
    free_port,
    log,
    stop,
    vllm_serve,
    wait_http,
)

ADMIN = "gpu-usage-admin-key"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def counters(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named counter from a worker's /metrics, summed over its label sets."""
    out = dict.fromkeys(names, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


async def workload(
    gw: str,
    key: str,
    n: int,
    concurrency: int,
    seed: int,
    first_error: dict[int, str],
    ignore_eos: bool,
) -> Counter[str]:
    """The requests (module docstring, step 4); `first_error` gets the first answer of each
    status other than 200."""
    rng = random.Random(seed)
    seen: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    headers = {"authorization": f"Bearer {key}"}
    # No keep-alive: a pooled connection the gateway closes for idling (uvicorn's 5 s)
    # just as the client reuses it fails with ReadError before the request is read (about
    # 1 in 3,000 requests at c=256 here, none of 12,000 without keep-alive).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:

        async def one(i: int) -> None:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
            chat = i % 2 == 0
            abort = rng.random() < 0.2
            body: dict[str, Any] = {"model": "smol", "temperature": 0.8}
            if abort:
                body["max_tokens"] = rng.randint(64, 256)
                if ignore_eos:  # vLLM's extension (an `openai` engine refuses it)
                    body["ignore_eos"] = True
            else:
                body["max_tokens"] = rng.randint(8, 32)
            if chat:
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
            stream = abort or rng.random() < 0.5
            body["stream"] = stream
            path = "/v1/chat/completions" if chat else "/v1/completions"
            cut = rng.randint(1, 6)
            async with sem:
                try:
                    if not stream:
                        r = await client.post(f"{gw}{path}", json=body, headers=headers)
                        seen["whole" if r.status_code == 200 else f"status {r.status_code}"] += 1
                        if r.status_code != 200:
                            first_error.setdefault(r.status_code, r.text)
                        return
                    async with client.stream(
                        "POST", f"{gw}{path}", json=body, headers=headers
                    ) as r:
                        if r.status_code != 200:
                            seen[f"status {r.status_code}"] += 1
                            first_error.setdefault(r.status_code, (await r.aread()).decode())
                            return
                        chunks = 0
                        async for _ in r.aiter_raw():
                            chunks += 1
                            if abort and chunks >= cut:
                                break
                    seen["cut by the client" if abort else "streamed"] += 1
                except httpx.HTTPError as e:
                    seen[f"error {type(e).__name__}"] += 1
                    first_error.setdefault(0, f"{e!r} ({'stream' if stream else 'whole'})")

        await asyncio.gather(*(one(i) for i in range(n)))
    return seen


def settled_usage(gw: str, key_id: str, deadline: float) -> dict[str, Any]:
    """The key's usage once nothing is in flight or reserved (cut streams settle after
    their count, in the background)."""
    headers = {"authorization": f"Bearer {ADMIN}"}
    while True:
        u: dict[str, Any] = httpx.get(
            f"{gw}/admin/keys/{key_id}/usage", headers=headers, timeout=10
        ).json()
        if (u["in_flight"], u["reserved_tokens"]) == (0, 0) or time.time() > deadline:
            return u
        time.sleep(0.2)


def one_level(
    a: argparse.Namespace,
    gw: str,
    worker_url: str,
    names: tuple[str, ...],
    level: int,
    name: str,
) -> dict[str, Any]:
    """Steps 3-5 at one concurrency, with a key of its own."""
    r = httpx.post(
        f"{gw}/admin/keys",
        json={"name": f"gpu-usage-c{level}"},
        headers={"authorization": f"Bearer {ADMIN}"},
    )
    r.raise_for_status()
    key = r.json()
    before = counters(worker_url, names)
    t0 = time.monotonic()
    first_error: dict[int, str] = {}
    seen = asyncio.run(
        workload(
            gw,
            key["key"],
            a.requests,
            level,
            seed=7,
            first_error=first_error,
            ignore_eos=not a.dry_run,
        )
    )
    out: dict[str, Any] = {
        "first_error": first_error,
        "workload_s": round(time.monotonic() - t0, 1),
        "outcomes": dict(seen),
    }
    usage = settled_usage(gw, key["id"], a.deadline)
    after = counters(worker_url, names)
    delta = {k: after[k] - before[k] for k in names}
    ledger = Counter[str]()
    for models in usage["days"].values():
        for m in models.values():
            ledger.update({k: v for k, v in m.items() if isinstance(v, int)})
    counted = delta[names[0]] + delta[names[1]]
    billed = ledger["prompt_tokens"] + ledger["completion_tokens"]
    out |= {
        "worker_counters": delta,
        "ledger": dict(ledger),
        "in_flight_after": (usage["in_flight"], usage["reserved_tokens"]),
        "counted": counted,
        "billed": billed,
        "drift": (counted - billed) / counted if counted else None,
    }
    log(
        f"{name}: outcomes {dict(seen)}; worker counted {counted:.0f} "
        f"(prompt {delta[names[0]]:.0f}, generated {delta[names[1]]:.0f}); "
        f"ledger {billed} (prompt {ledger['prompt_tokens']}, completion "
        f"{ledger['completion_tokens']}); drift {out['drift']:.4%}"
        + (f"; unsent {delta[names[2]]:.0f}" if len(names) > 2 else "")
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="/root/smol", help="the checkpoint vLLM serves")
    p.add_argument("--deadline", type=float, default=time.time() + 540, help="epoch seconds")
    p.add_argument("--dry-run", action="store_true", help="a simulator instead of vLLM")
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", default="64,256", help="levels, one after another")
    p.add_argument("--vllm-args", default="", help="more `vllm serve` arguments")
    p.add_argument("--compare", action="store_true", help="also without the drain (first level)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dry_run": a.dry_run, "errors": []}
    worker: Any = None
    gateway: Any = None
    procs = Spawned()

    wport = free_port()
    worker_url = f"http://127.0.0.1:{wport}"
    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    try:
        # 1. the worker
        if a.dry_run:
            cmd = [sys.executable, "-m", "simulator", "--port", str(wport), "--model", "smol",
                   "--itl-ms", "10", "--tokens-per-chunk", "2"]  # fmt: skip
            names += ("gateway_sim:unsent_tokens_total",)
        else:
            cmd = vllm_serve(a.model, wport, *a.vllm_args.split())
        results["worker_command"] = cmd
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        worker = procs.start(cmd, a.out / "worker.log", env, cwd=REPO)
        results["worker_ready_s"] = wait_http(f"{worker_url}/health", a.deadline, worker)
        log(f"worker ready: {worker_url}")

        # 2. the gateway, attached, with a keys file and one key
        config = attached_config(
            a.out / "models.yaml",
            "openai" if a.dry_run else "vllm",
            worker_url,
            # vLLM's extension, turned on for this model (streams to cut must still be
            # generating when their client leaves)
            request_fields={"allow_extra": [] if a.dry_run else ["ignore_eos"]},
        )
        genv = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "GATEWAY_ADMIN_KEY": ADMIN,
            "GATEWAY_KEYS_FILE": str(a.out / "keys.json"),
        }
        results["levels"] = {}
        # The gateway as shipped, then (`--compare`) one that reads nothing after the
        # client left (ABANDON_DRAIN_S = 0: what was received is still counted, nothing in
        # flight), to show what the half-close's read recovers.
        for drain in (None, 0.0) if a.compare else (None,):
            gport = free_port()
            gw = f"http://127.0.0.1:{gport}"
            patch = "" if drain is None else f"a.ABANDON_DRAIN_S = {drain}; "
            code = (
                "import runpy, sys; import engines.upstream.attempt as a; "
                f"{patch}sys.argv[0] = 'gateway'; runpy.run_module('gateway', run_name='__main__')"
            )
            gateway = procs.start(
                [sys.executable, "-c", code, "serve", "--config", str(config),
                 "--port", str(gport)],
                a.out / f"gateway-{'shipped' if drain is None else 'no-drain'}.log",
                genv,
                cwd=REPO,
            )  # fmt: skip
            wait_http(f"{gw}/health", a.deadline, gateway)
            log(f"gateway ready: {gw} (drain {'as shipped' if drain is None else drain})")
            levels = a.concurrency.split(",") if drain is None else a.concurrency.split(",")[:1]
            for level in map(int, levels):
                name = f"c={level}" + ("" if drain is None else " no drain")
                results["levels"][name] = one_level(a, gw, worker_url, names, level, name)
            stop(gateway)
            gateway = None
    except Exception as e:
        results["errors"].append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        stop(gateway)
        stop(worker)
        procs.close()
        (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        log(f"results: {a.out / 'results.json'}; errors: {results['errors']}")
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
