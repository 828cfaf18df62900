"""Stored responses across front doors: `gateway serve --workers 3` with the real Redis
(own key prefix) and a two-replica simulator model; a chain of turns, each on a new
connection (so the kernel spreads them over the front doors, told apart by their request
ids' per-process prefix), streamed and not, retrieved through any front door, and still
another key's 404."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.gateway.procs import SHARED_REDIS, GatewayProcess, clean_prefix, new_prefix
from tests.gateway.test_tenancy import create_key

OUT = 4  # the simulator's answer: four words, four tokens


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[GatewayProcess]:
    prefix = new_prefix()
    models = [
        {
            "name": "m",
            "engine": "sim",
            "replicas": 2,
            "options": {"itl_ms": 1, "output_tokens": OUT},
        }
    ]
    env = {
        "GATEWAY_REDIS_URL": SHARED_REDIS,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_DRAIN_SECONDS": "5",
    }
    gw = GatewayProcess(models, tmp_path, ("--workers", "3"), **env)
    try:
        yield gw.wait_ready(timeout=180)
    finally:
        gw.stop()
        clean_prefix(prefix)


def _client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    """A new client: a new connection, so possibly another front door."""
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def test_a_chain_crosses_front_doors(fleet: GatewayProcess) -> None:
    key = create_key(fleet.url)["key"]
    other = create_key(fleet.url)["key"]
    fronts: list[str] = []
    ids: list[str] = []
    turn = 0
    # Until the chain has been through two front doors at least (3 of them: 30 turns all on
    # one is a chance of 3^-29), and at least four turns.
    while turn < 4 or len(set(fronts)) < 2:
        assert turn < 30, f"every turn on one front door: {fronts}"
        turn += 1
        with _client(fleet, key) as c:
            kwargs: dict[str, Any] = {"previous_response_id": ids[-1]} if ids else {}
            if turn % 2:
                raw = c.responses.with_raw_response.create(model="m", input=f"w{turn}", **kwargs)
                resp = raw.parse()
                rid = raw.headers["x-request-id"]
            else:
                with c.responses.with_streaming_response.create(
                    model="m", input=f"w{turn}", stream=True, **kwargs
                ) as raw_stream:
                    rid = raw_stream.headers["x-request-id"]
                    events = list(raw_stream.parse())
                resp = events[-1].response  # type: ignore[union-attr]
                assert events[-1].type == "response.completed"
        fronts.append(rid[:12])  # the front door's per-process request-id prefix
        # The whole chain reached the engine: every earlier input and answer, then this one.
        assert resp.usage is not None
        assert resp.usage.input_tokens == turn + OUT * (turn - 1), (turn, fronts)
        ids.append(resp.id)
    # Any front door retrieves any turn; another key finds none of them.
    for rid in (ids[0], ids[-1]):
        for _ in range(3):
            with _client(fleet, key) as c:
                assert c.responses.retrieve(rid).id == rid
        with _client(fleet, other) as c, pytest.raises(openai.NotFoundError):
            c.responses.retrieve(rid)
    with _client(fleet, key) as c:
        items = c.responses.input_items.list(ids[-1], limit=100).data
        assert len(items) == 2 * turn - 1
