"""Instructions per routing decision, counted rather than timed: `Router.pick` over 16
endpoints, N untimed picks of one policy, for `valgrind --tool=cachegrind` to count.

    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
        .venv/bin/python bench/pick_count.py --tree . --policy prefix --picks 5000

Run it with `--policy none` too (the same set-up and loop without the pick) and with
another checkout's `--tree`: (I refs of a policy − I refs of none) ÷ picks is the
instructions one decision costs, the same on a loaded or a quiet machine, which wall-time
percentiles on a shared 2-core box are not (bench/routing.py --pick-only times them).
Each pick sees the outstanding counts of one of 64 precomputed draws (0..7 per endpoint)
and one of 64 requests (adapter, prefix and session keys), as bench/routing.py does.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

POLICIES: dict[str, dict[str, float] | None] = {
    "none": None,
    "lo": {"least_outstanding": 1},
    "prefix": {"prefix_affinity": 2, "least_outstanding": 1},
    "session": {"session_affinity": 2, "least_outstanding": 1},
    "lora": {"lora_affinity": 2, "least_outstanding": 1},
    "all6": {
        "least_outstanding": 1,
        "queue_depth": 1,
        "kv_cache": 1,
        "prefix_affinity": 1,
        "session_affinity": 1,
        "lora_affinity": 1,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--policy", choices=sorted(POLICIES), required=True)
    ap.add_argument("--picks", type=int, default=5000)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve()))
    from engines.spec import RoutingSpec
    from engines.upstream.endpoints import Endpoint
    from engines.upstream.routing import SCORERS, Router, RoutingRequest
    from engines.upstream.routing.hashring import stable_hash

    rng = random.Random(3)
    eps = [Endpoint.make(f"http://10.0.0.{i}:8000") for i in range(16)]
    for i, e in enumerate(eps):
        e.healthy = True
        e.adapters = {f"ad{(i * 4 + k) % 16}": None for k in range(4)}
        e.adapter_slots = 4
    keys = [stable_hash(f"k{i}") for i in range(64)]
    outs = [[rng.randrange(8) for _ in eps] for _ in range(64)]
    reqs = [
        RoutingRequest(
            adapter=f"ad{rng.randrange(16)}", prefix=rng.choice(keys), session=rng.choice(keys)
        )
        for _ in range(64)
    ]
    policy = POLICIES[args.policy]
    router = None if policy is None else Router.from_spec(RoutingSpec(scorers=policy), SCORERS)
    for k in range(args.picks):
        for e, x in zip(eps, outs[k & 63], strict=True):
            e.outstanding = x
        if router is not None:
            router.pick(eps, reqs[k & 63])


if __name__ == "__main__":
    main()
