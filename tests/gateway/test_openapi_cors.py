"""The operator surface of a running gateway (in front of simulator workers): the OpenAPI
document lists every route with its schemas, CORS answers preflights on every route
(the hot ones included) without reaching an engine, the probes, the process metrics and
the 15-minute end-to-end buckets, and the Grafana dashboard only queries metrics the
gateway exports."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount, Route

from gateway.api import COLD, HOT
from tests.conftest import REPO, ServerThread, start_gateway
from tests.gateway.test_api_sim import SimThread

DASHBOARD = REPO / "deploy" / "grafana" / "llm-gateway.json"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def fleet(sims: SimThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    worker = sims.start(model="m")
    doomed = sims.start(model="doomed")
    models = [
        {"name": "m", "engine": "openai", "endpoints": [worker.url]},
        {
            "name": "doomed",
            "engine": "openai",
            "endpoints": [doomed.url],
            "options": {"health_interval_s": 0.05},
        },
    ]
    gw = start_gateway(models, tmp_path_factory.mktemp("ops"))
    yield {"gw": gw, "worker": worker, "doomed": doomed, "sims": sims}
    gw.stop()
    sims.call(worker.stop())


def _app_paths(gw: ServerThread) -> set[str]:
    paths = set(HOT)
    for route in COLD:
        if isinstance(route, Route) and route.include_in_schema:
            paths.add(re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path))
        elif isinstance(route, Mount):
            paths.add(route.path)
    return paths


def test_openapi_lists_every_route_with_schemas(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    doc = httpx.get(f"{gw.url}/openapi.json").json()
    assert set(doc["paths"]) == _app_paths(gw)
    schemas = doc["components"]["schemas"]

    def resolve(ref: str) -> dict[str, Any]:
        assert ref.startswith("#/components/schemas/")
        return schemas[ref.rsplit("/", 1)[1]]  # type: ignore[no-any-return]

    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert op["responses"].get("200") or op["responses"].get("201"), (path, method)
            for name in re.findall(r"\{(\w+)\}", path):  # every path parameter declared
                assert {"name": name, "in": "path"}.items() <= next(
                    p for p in op["parameters"] if p["name"] == name
                ).items(), (path, method)
            if method == "post":
                body = resolve(op["requestBody"]["content"]["application/json"]["schema"]["$ref"])
                assert body["properties"], path
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    request = resolve(chat["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert {"model", "messages", "stream", "max_tokens"} <= set(request["properties"])
    assert set(request["required"]) == {"model", "messages"}
    ok = chat["responses"]["200"]["content"]
    assert resolve(ok["application/json"]["schema"]["$ref"])["properties"]["choices"]
    assert "text/event-stream" in ok
    error = resolve(chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"])
    assert error["required"] == ["error"]
    docs = httpx.get(f"{gw.url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_openapi_document_is_valid(fleet: dict[str, Any]) -> None:
    """The whole served document passes an OpenAPI 3.1 validator (schema validators and
    client generators refused it while `/admin/keys/{key_id}` declared no `key_id`)."""
    from openapi_spec_validator import OpenAPIV31SpecValidator

    doc = httpx.get(f"{fleet['gw'].url}/openapi.json").json()
    errors = [str(e).splitlines()[0] for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []
    assert doc["paths"]["/admin/keys/{key_id}/usage"]["get"]["parameters"][0]["in"] == "path"


def _worker_requests(fleet: dict[str, Any]) -> int:
    return int(fleet["worker"].requests_total)


def test_cors_preflight_on_hot_and_cold_routes_never_reaches_an_engine(
    fleet: dict[str, Any],
) -> None:
    gw = fleet["gw"]
    before = _worker_requests(fleet)
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health"):
        r = httpx.options(
            f"{gw.url}{path}",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert r.status_code == 200, (path, r.text)
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert _worker_requests(fleet) == before
    # The actual request from the page carries the header too; a non-browser one does not.
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"origin": "https://x"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    streamed = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"origin": "https://x"},
    )
    assert streamed.headers["access-control-allow-origin"] == "*"
    assert streamed.text.endswith("data: [DONE]\n\n")


def test_cors_configured_origins(fleet: dict[str, Any], tmp_path: Path) -> None:
    models = [{"name": "m", "engine": "openai", "endpoints": [fleet["worker"].url]}]
    gw = start_gateway(
        models, tmp_path, cors_origins="https://good.example", cors_allow_credentials=True
    )
    try:
        pre = {"access-control-request-method": "POST"}
        good = httpx.options(
            f"{gw.url}/v1/completions", headers={"origin": "https://good.example", **pre}
        )
        assert good.status_code == 200
        assert good.headers["access-control-allow-origin"] == "https://good.example"
        assert good.headers["access-control-allow-credentials"] == "true"
        bad = httpx.options(
            f"{gw.url}/v1/completions", headers={"origin": "https://evil.example", **pre}
        )
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    finally:
        gw.stop()


def test_probes(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    assert httpx.get(f"{gw.url}/health/live").json() == {"status": "alive"}
    assert httpx.get(f"{gw.url}/health/ready").status_code == 200
    # One model losing its only worker: /health degrades, /health/ready stays 200.
    fleet["sims"].call(fleet["doomed"].stop())
    deadline = time.monotonic() + 10
    while httpx.get(f"{gw.url}/health").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(f"{gw.url}/health/ready").status_code == 200
    assert httpx.get(f"{gw.url}/health/live").status_code == 200


def _exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_metrics_process_series_long_buckets_and_the_dashboard(fleet: dict[str, Any]) -> None:
    gw = fleet["gw"]
    httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT).raise_for_status()
    text = httpx.get(f"{gw.url}/metrics").text
    exported = _exported(text)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert name in exported
    assert re.search(r'gateway_request_duration_seconds_bucket\{.*le="900\.0"', text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(exprs) >= 20
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "request rate", "first token", "inter-token", "end-to-end", "in flight", "queue",
        "worker health", "restarts", "adapters", "retries", "kv-cache", "speculative",
    ):  # fmt: skip
        assert topic in titles, topic
    for expr in exprs:
        names = re.findall(r"\b((?:gateway|process)_[a-z_]+)", expr)
        assert names, expr
        missing = [n for n in names if n not in exported]
        assert not missing, (expr, missing)


def test_status_names_workers_only_for_the_admin(fleet: dict[str, Any]) -> None:
    from tests.conftest import ADMIN_KEY

    gw = fleet["gw"]
    anyone = httpx.get(f"{gw.url}/status").json()
    (m,) = [x for x in anyone["models"] if x["name"] == "m"]
    assert m["ready"] and [w["url"] for w in m["workers"]] == ["worker 1"]
    assert m["workers"][0]["healthy"] is True and m["workers"][0]["kv_cache_usage"] is not None
    admin = httpx.get(f"{gw.url}/status", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    (m,) = [x for x in admin.json()["models"] if x["name"] == "m"]
    assert [w["url"] for w in m["workers"]] == [fleet["worker"].url]
    assert set(anyone["traffic"]) == {"requests", "in_flight", "histograms"}
