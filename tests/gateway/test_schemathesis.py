"""A bounded schemathesis run against the gateway's own /openapi.json: requests generated
from every operation's schema (valid and invalid bodies, headers, path parameters) must
never get a 5xx, and every answer must conform to the document (status, content type,
body schema). The gateway serves simulator models (engine `sim`) under the names the
schema's examples cannot guess, so most bodies end at validation or a 404: that path is
what this run exercises; the generated valid bodies that name a served model reach it.
The admin operations are called with the admin key (hashed keys on, in a keys file), so
their bodies and path parameters reach the key admin, not just the 401; the others with
a plaintext client key."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_KEY, ServerThread, start_gateway

MAX_EXAMPLES = 12
CLIENT_KEY = "fuzz-client-key"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    models = [
        {"name": "m", "engine": "sim", "options": {"output_tokens": 3}},
        {"name": "e", "engine": "sim", "task": "embed"},
    ]
    tmp = tmp_path_factory.mktemp("fuzz")
    server = start_gateway(
        models, tmp, access_log=False, keys_file=tmp / "keys.json", api_keys=CLIENT_KEY
    )
    yield server
    server.stop()


def _fuzz(op: schemathesis.APIOperation, base_url: str, token: str) -> list[int]:
    """Up to MAX_EXAMPLES generated requests to one operation, with `token` as the Bearer
    key; their statuses."""
    seen: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy())
    def run(case: schemathesis.Case) -> None:
        response = case.call(
            base_url=base_url, headers={"authorization": f"Bearer {token}"}, timeout=30
        )
        seen.append(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
        )
        # And the answer is what the document says: a documented status, content type and
        # body schema.
        case.validate_response(
            response,
            checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        )

    run()
    return seen


def test_no_generated_request_gets_a_5xx(gw: ServerThread) -> None:
    schema = schemathesis.openapi.from_url(f"{gw.url}/openapi.json")
    statuses: Counter[int] = Counter()
    operations = 0
    admin: Counter[int] = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        tags = schema.raw_schema["paths"][op.path][op.method.lower()].get("tags", [])
        seen = _fuzz(op, gw.url, ADMIN_KEY if "Admin" in tags else CLIENT_KEY)
        assert seen, f"no request generated for {op.method} {op.path}"
        statuses.update(seen)
        if op.path.startswith("/admin/"):
            admin.update(seen)
    assert operations == sum(len(methods) for methods in schema.raw_schema["paths"].values())
    # The key admin was reached past its authentication: keys created, unknown ids 404.
    assert admin[201] and admin[404] and not admin[401], admin
    assert not [s for s in statuses if s >= 500]
    assert any(400 <= s < 500 for s in statuses) and 200 in statuses
