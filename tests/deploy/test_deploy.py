"""The Kubernetes manifests and the compose fleet, checked offline.

Each overlay is rendered with `kubectl kustomize` (Debian's kubernetes-client; `make
test` installs it when missing) and every object is validated with kubernetes-validate
against a pinned Kubernetes version, strict (unknown fields fail). The ServiceMonitor is
a Prometheus Operator CRD whose schema kubernetes-validate does not carry: its fields are
asserted here instead. Then: probes on the right endpoints, shutdown ordering (grace >
preStop + drain), the restricted Pod Security Standard, resource requests, GPU workers
(GPUs, /dev/shm, model volume, --shutdown-timeout), the required Secret, image by tag or
digest, and that no shipped models file has drifted from its source.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.catalog import parse_catalog
from simulator.config import config_from_args
from tests.conftest import REPO

K8S_VERSION = "1.33.0"
KUSTOMIZE = REPO / "deploy" / "kustomize"
OVERLAYS = ("cpu", "gpu", "redis-persistent", "redis-sentinel")


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not installed: `make test` installs Debian's kubernetes-client "
            "(apt-get install -y kubernetes-client)"
        )
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(KUSTOMIZE / "overlays" / request.param)


def _by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _by_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_every_object_validates_against_kubernetes(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"} <= kinds
    assert {"PodDisruptionBudget", "ServiceMonitor"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: asserted in test_scaling_and_monitoring
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _pre_stop_s(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def _assert_restricted(pod: dict[str, Any], where: str, claims: tuple[str, ...] = ()) -> None:
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) != 0, where
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
    assert not any("hostPath" in v for v in pod.get("volumes", [])), where
    writable = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    writable |= set(claims)  # a StatefulSet's own PersistentVolumeClaims (Redis data)
    for c in pod["containers"]:
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False, where
        assert csc["capabilities"]["drop"] == ["ALL"] and "add" not in csc["capabilities"]
        assert csc["readOnlyRootFilesystem"] is True, where
        assert not csc.get("privileged"), where
        mounts = {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert mounts and mounts <= writable, (where, "writable volumes must be emptyDirs")
        requests = c["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], where
        assert c["resources"]["limits"]["memory"], where


def test_restricted_pod_security_and_resources(objects: list[dict[str, Any]]) -> None:
    deployments = _by_kind(objects, "Deployment")
    assert len(deployments) >= 1
    for d in deployments:
        _assert_restricted(d["spec"]["template"]["spec"], d["metadata"]["name"])
    for s in _by_kind(objects, "StatefulSet"):
        claims = tuple(c["metadata"]["name"] for c in s["spec"].get("volumeClaimTemplates", []))
        _assert_restricted(s["spec"]["template"]["spec"], s["metadata"]["name"], claims)
    assert len(deployments) + len(_by_kind(objects, "StatefulSet")) >= 2


def test_gateway_probes_shutdown_order_secret_and_image(objects: list[dict[str, Any]]) -> None:
    dep = _named(objects, "Deployment", "llm-gateway")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading
    env = _env(c)
    drain = int(env["GATEWAY_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > _pre_stop_s(c) + drain
    for var, key in (("GATEWAY_API_KEYS", "api-keys"), ("GATEWAY_ADMIN_KEY", "admin-key")):
        ref = env[var]["secretKeyRef"]
        assert ref == {"name": "llm-gateway-keys", "key": key}  # not optional
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    image = c["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    if "GATEWAY_REDIS_SENTINELS" in env:  # test_redis_sentinel_overlay
        assert env["GATEWAY_REDIS_URL"] == "redis://mymaster/0"
    else:
        assert env["GATEWAY_REDIS_URL"] == "redis://llm-gateway-redis:6379/0"
        _named(objects, "Service", "llm-gateway-redis")


def test_scaling_and_monitoring(objects: list[dict[str, Any]]) -> None:
    labels = _named(objects, "Deployment", "llm-gateway")["spec"]["selector"]["matchLabels"]
    hpa = _named(objects, "HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llm-gateway"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "gateway_requests_in_flight"
    pdb = _named(objects, "PodDisruptionBudget", "llm-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == labels and pdb["spec"]["minAvailable"] >= 1
    sm = _named(objects, "ServiceMonitor", "llm-gateway")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"] == labels
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    svc = _named(objects, "Service", "llm-gateway")
    assert svc["spec"]["selector"] == labels
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]


def _models_file(objects: list[dict[str, Any]]) -> str:
    (cm,) = [
        o
        for o in _by_kind(objects, "ConfigMap")
        if o["metadata"]["name"].startswith("llm-gateway-models")
    ]
    return str(cm["data"]["models.yaml"])


def test_cpu_overlay_ships_the_repository_models_yaml() -> None:
    objects = render(KUSTOMIZE / "overlays" / "cpu")
    source = (REPO / "models.yaml").read_text()
    assert _models_file(objects) == source
    assert (KUSTOMIZE / "base" / "models.yaml").read_text() == source


def _argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def test_redis_persistent_overlay_keeps_its_data_on_a_claim() -> None:
    objects = render(KUSTOMIZE / "overlays" / "redis-persistent")
    assert [d["metadata"]["name"] for d in _by_kind(objects, "Deployment")] == ["llm-gateway"]
    sts = _named(objects, "StatefulSet", "llm-gateway-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    argv = _argv(c)
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"  # never drop a ledger
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[argv[argv.index("--dir") + 1]] == claim["metadata"]["name"]
    svc = _named(objects, "Service", "llm-gateway-redis")  # the URL in the base reaches it
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


def test_redis_sentinel_overlay(tmp_path: Path) -> None:
    from gateway.settings import Settings
    from gateway.state_store.target import RedisTarget

    objects = render(KUSTOMIZE / "overlays" / "redis-sentinel")
    (gw,) = _named(objects, "Deployment", "llm-gateway")["spec"]["template"]["spec"]["containers"]
    env = _env(gw)
    target = RedisTarget.from_settings(
        Settings(
            redis_url=env["GATEWAY_REDIS_URL"],
            redis_sentinels=env["GATEWAY_REDIS_SENTINELS"],
            redis_sentinel_master=env["GATEWAY_REDIS_SENTINEL_MASTER"],
        )
    )
    # The gateway lists every sentinel pod by its stable name under a headless Service.
    sentinels = _named(objects, "StatefulSet", "llm-gateway-redis-sentinel")
    spec = sentinels["spec"]
    headless = _named(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == spec["selector"]["matchLabels"]
    (sc,) = spec["template"]["spec"]["containers"]
    (port,) = [p["containerPort"] for p in sc["ports"]]
    name = sentinels["metadata"]["name"]
    assert target.sentinels == tuple(
        (f"{name}-{i}.{spec['serviceName']}", port) for i in range(spec["replicas"])
    )
    assert spec["replicas"] == 3
    # Two data nodes on claims, reachable only by their own names (no Service that
    # would also send the gateway to the replica).
    data = _named(objects, "StatefulSet", "llm-gateway-redis")
    assert data["spec"]["replicas"] == 2 and data["spec"]["volumeClaimTemplates"]
    data_headless = _named(objects, "Service", data["spec"]["serviceName"])
    assert data_headless["spec"]["clusterIP"] == "None"
    labels = data["spec"]["selector"]["matchLabels"]
    assert [s for s in _by_kind(objects, "Service") if s["spec"]["selector"] == labels] == [
        data_headless
    ]
    (cm,) = [
        o
        for o in _by_kind(objects, "ConfigMap")
        if o["metadata"]["name"].startswith("llm-gateway-redis-scripts")
    ]
    scripts = cm["data"]
    primary0 = f"llm-gateway-redis-0.{data['spec']['serviceName']}"
    quorum = 2
    assert (
        f"sentinel monitor {target.sentinel_master} $primary 6379 {quorum}\n"
        in (scripts["start-sentinel.sh"])
    )
    assert quorum > spec["replicas"] // 2
    assert "--min-replicas-to-write 1" in scripts["start-redis.sh"]
    for script in ("start-redis.sh", "start-sentinel.sh"):
        assert primary0 in scripts[script]
        assert f"get-master-addr-by-name {target.sentinel_master}" in scripts[script]
        (tmp_path / script).write_text(scripts[script])
        done = subprocess.run(["sh", "-n", str(tmp_path / script)], capture_output=True)
        assert done.returncode == 0, done.stderr


def _render_gpu_module() -> Any:
    spec = importlib.util.spec_from_file_location("render_gpu", REPO / "deploy" / "render_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_overlay_is_generated_from_its_source_and_attaches_by_service_dns() -> None:
    module = _render_gpu_module()
    for path, text in module.render().items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/render_gpu.py"
    objects = render(KUSTOMIZE / "overlays" / "gpu")
    catalog = parse_catalog(yaml.safe_load(_models_file(objects)), base_dir=REPO)
    sources = yaml.safe_load((KUSTOMIZE / "overlays" / "gpu" / "workers.yaml").read_text())
    assert [m.name for m in catalog.models] == [m["name"] for m in sources["models"]]
    for model in catalog.models:
        (url,) = model.endpoints
        host, port = url.removeprefix("http://").split(":")
        svc = _named(objects, "Service", host)
        assert [p["port"] for p in svc["spec"]["ports"]] == [int(port)]
        dep = _named(objects, "Deployment", host)
        assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        argv = [*c["command"], *c["args"]]
        assert argv[:2] == ["vllm", "serve"]
        assert argv[argv.index("--served-model-name") + 1] == model.upstream_name
        assert argv[argv.index("--max-model-len") + 1] == str(model.max_model_len)
        assert argv[argv.index("--port") + 1] == port
        shutdown = int(argv[argv.index("--shutdown-timeout") + 1])
        assert pod["terminationGracePeriodSeconds"] > _pre_stop_s(c) + shutdown
        res = c["resources"]
        assert int(res["requests"]["nvidia.com/gpu"]) >= 1
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes[mounts["/models"]]
        assert argv[2].startswith("/models/")
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_image_by_digest(tmp_path: Path) -> None:
    shutil.copytree(KUSTOMIZE, tmp_path / "kustomize")
    overlay = tmp_path / "kustomize" / "overlays" / "pinned"
    overlay.mkdir()
    digest = "sha256:" + "ab" * 32
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "bases": ["../cpu"],
                "images": [
                    {"name": "ghcr.io/example/llm-gateway", "newTag": "0.1.0", "digest": digest}
                ],
            }
        )
    )
    dep = _named(render(overlay), "Deployment", "llm-gateway")
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    # kustomize 5 keeps the tag beside the digest (`name:tag@digest`), 2.0 drops it.
    assert image in {f"ghcr.io/example/llm-gateway{t}@{digest}" for t in ("", ":0.1.0")}


def test_compose_fleet_is_consistent() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway", "redis", "sim-1", "sim-2"} <= set(services)
    gateway = services["gateway"]
    target = ":/etc/llm-gateway/models.yaml:ro"
    models_mount = next(v for v in gateway["volumes"] if v.endswith(target))
    models_path = REPO / models_mount.split(":")[0]
    assert gateway["environment"]["GATEWAY_CONFIG"] == "/etc/llm-gateway/models.yaml"
    catalog = parse_catalog(yaml.safe_load(models_path.read_text()), base_dir=REPO)
    endpoints = {url for m in catalog.models for url in m.endpoints}
    assert endpoints == {"http://sim-1:8000", "http://sim-2:8000"}
    for name in ("sim-1", "sim-2"):
        command = services[name]["command"]
        assert command[:3] == ["python", "-m", "simulator"]
        config, host, port = config_from_args(command[3:])
        assert (host, port) == ("0.0.0.0", 8000)
        assert config.model in {m.upstream_name for m in catalog.models}
    assert set(gateway["depends_on"]) == {"sim-1", "sim-2", "redis"}
    assert gateway["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
