"""deploy/kubernetes/embedserve.yaml: a PVC, a Deployment with probes on the metrics port, a Service; the container's
environment through the real config loader, and the names that tie the objects together."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import Config, ServerConfig, load_config
from tests.unit.deploy.deploy_files import KUBERNETES, load_yaml_documents


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    docs = load_yaml_documents(KUBERNETES)
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs) == 3 and set(by_kind) == {"PersistentVolumeClaim", "Deployment", "Service"}
    for doc in docs:
        assert doc["apiVersion"] == ("apps/v1" if doc["kind"] == "Deployment" else "v1")
        assert doc["metadata"]["name"]
    return by_kind


def _container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _config(container: dict[str, Any]) -> Config:
    """The config the container's environment gives (a variable from an optional Secret counts as unset)."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return load_config(env=env)


def _port(container: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == name)


def test_environment_is_a_valid_config_matching_the_ports(objects: dict[str, dict[str, Any]]) -> None:
    container = _container(objects)
    cfg = _config(container)
    assert cfg.server.host == "0.0.0.0" and cfg.server.metrics_host == "0.0.0.0"
    assert _port(container, "grpc") == cfg.server.port
    assert _port(container, "metrics") == cfg.server.metrics_port
    secret = next(e for e in container["env"] if e["name"] == "EMBEDSERVE_SERVER_AUTH_TOKEN")
    assert secret["valueFrom"]["secretKeyRef"]["optional"] is True
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.server.metrics_port)


def test_probes_use_healthz_and_readyz_on_the_metrics_port(objects: dict[str, dict[str, Any]]) -> None:
    container = _container(objects)
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "metrics", f"{probe} should GET {path} on the metrics port"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room to open and replay the index"


def test_data_directory_is_on_the_claim(objects: dict[str, dict[str, Any]]) -> None:
    container = _container(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == str(_config(container).data_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = objects["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", "one server per data directory"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "the volume is writable"


def test_shutdown_outlasts_the_drain(objects: dict[str, dict[str, Any]]) -> None:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > ServerConfig().grace_seconds


def test_selectors_match_and_the_service_names_the_container_ports(objects: dict[str, dict[str, Any]]) -> None:
    deployment, service = objects["Deployment"], objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    container = _container(objects)
    names = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names
        assert port["port"] == _port(container, port["targetPort"])
