"""Routing plugins on real `Endpoint`s: filters (healthy, ejected, half-open, tried), the
affinity scorers' consistent hashing with bounded load, random ties, and the prompt prefix
key."""

from __future__ import annotations

from collections import Counter

from engines.spec import RoutingSpec
from engines.upstream.endpoints import Endpoint
from engines.upstream.routing import SCORERS, Router, RoutingRequest
from engines.upstream.routing.hashring import stable_hash
from engines.upstream.routing.prefix import prompt_prefix


def fleet(n: int) -> list[Endpoint]:
    eps = [Endpoint.make(f"http://10.0.0.{i}:8000") for i in range(n)]
    for e in eps:
        e.healthy = True
    return eps


def router(**routing: object) -> Router:
    return Router.from_spec(RoutingSpec.model_validate(routing), SCORERS)


def test_filters_skip_down_ejected_busy_half_open_and_tried() -> None:
    eps = fleet(4)
    eps[0].healthy = False
    eps[1].ejected = True
    eps[2].half_open, eps[2].outstanding = True, 1
    r = router()
    assert {r.pick(eps) for _ in range(8)} == {eps[3]}
    assert r.pick(eps, exclude=[eps[3]]) is None
    eps[2].outstanding = 0  # half-open and idle: takes one request
    assert eps[2] in {r.pick(eps) for _ in range(8)}


def test_prefix_affinity_is_sticky_and_spreads_keys() -> None:
    eps = fleet(4)
    r = router(scorers={"prefix_affinity": 2, "least_outstanding": 1})
    owners = {}
    for k in range(8):
        key = stable_hash(f"system prompt {k}")
        picks = {r.pick(eps, RoutingRequest(prefix=key)) for _ in range(5)}
        assert len(picks) == 1  # idle fleet: always the key's owner
        owners[k] = picks.pop()
    assert len(set(owners.values())) >= 3  # 8 keys land on several workers


def test_bounded_load_spills_a_hot_prefix() -> None:
    eps = fleet(4)
    r = router(scorers={"prefix_affinity": 1}, load_factor=1.25)
    key = RoutingRequest(prefix=stable_hash("one hot prefix"))
    counts: Counter[int] = Counter()
    for _ in range(40):  # requests that stay in flight
        e = r.pick(eps, key)
        assert e is not None
        e.outstanding += 1
        counts[eps.index(e)] += 1
    # The owner takes up to ceil(1.25 × mean) and the rest spill over the ring.
    assert max(counts.values()) <= 13 and len(counts) == 4


def test_session_affinity_keeps_a_session_on_one_worker() -> None:
    eps = fleet(3)
    r = router(scorers={"session_affinity": 1, "least_outstanding": 0.5})
    for s in ("alice", "bob", "carol"):
        req = RoutingRequest(session=stable_hash(s))
        assert len({r.pick(eps, req) for _ in range(6)}) == 1
    assert r.needs == {"session"}


def test_random_ties_reach_every_worker() -> None:
    eps = fleet(4)
    r = router(ties="random")
    assert len({r.pick(eps) for _ in range(200)}) == 4


def test_prompt_prefix() -> None:
    chat = {
        "messages": [{"role": "system", "content": "S" * 600}, {"role": "user", "content": "hi"}]
    }
    assert prompt_prefix(chat, 512) == "system:" + "S" * 505
    assert prompt_prefix({"prompt": ["abc", "x"]}, 2) == "ab"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hey"}]}]}
    assert prompt_prefix(parts, 100) == "user:hey\n"
