"""The official openai Node SDK (tests/node: `npm ci --prefix tests/node`, run by `make
test`) against `/v1/responses` in front of simulator workers: plain text, instructions with
message input, the streamed events in order with the final response equal to the deltas,
a two-turn chain retrieved and listed, delete, and 404s as the SDK's NotFoundError. The
checks are in tests/node/responses.mjs; this starts the gateway and runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerThread, start_gateway
from tests.gateway.test_api_sim import SimThread

NODE_DIR = REPO / "tests" / "node"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "openai").is_dir(),
    reason="node or the openai Node SDK is missing (make test installs them)",
)


@pytest.fixture(scope="module")
def gw(sims: SimThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    workers = [sims.start(model="m", itl_ms=1, output_tokens=5) for _ in range(2)]
    server = start_gateway(
        [{"name": "m", "engine": "openai", "endpoints": [w.url for w in workers]}],
        Path(tmp_path_factory.mktemp("node")),
    )
    yield server
    server.stop()
    for w in workers:
        sims.call(w.stop())


def test_node_sdk_responses(gw: ServerThread) -> None:
    run = subprocess.run(
        ["node", str(NODE_DIR / "responses.mjs"), gw.url, "m"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=NODE_DIR,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(seen["plain"].split()) == 5
    assert seen["instructions_input_tokens"] == 4  # "Answer briefly." + "Say hello."
    assert seen["stream_events"] == 2 + 2 + 5 + 3 + 1  # created … 5 deltas … completed
    assert seen["not_found"] == 2 and len(seen["chain"]) == 2
