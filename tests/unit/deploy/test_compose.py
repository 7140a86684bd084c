"""deploy/compose.yaml and what it mounts: structure, the server's environment through the real config loader, and
the wiring between embedserve, Prometheus and Grafana (names, ports, paths, the datasource uid)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.config import Config, ServerConfig, load_config
from tests.unit.deploy.deploy_files import (
    COMPOSE,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    DEPLOY,
    PROMETHEUS_CONFIG,
    ROOT,
    dashboard,
    load_yaml,
)

SERVERS = {"embedserve": ("cpu", "cpu"), "embedserve-gpu": ("gpu", "cuda")}
"""Compose service -> (its profile, the backbone device it runs on)."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set in the environment."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _server_config(service: dict[str, Any]) -> Config:
    env = {key: _interpolate(str(value)) for key, value in service["environment"].items()}
    return load_config(env=env)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or a path relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        mounts[target] = source
    return mounts


def _dockerfile_targets() -> set[str]:
    text = (ROOT / "Dockerfile").read_text()
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE))


def test_services_profiles_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*SERVERS, "prometheus", "grafana"}
    for name, (profile, _) in SERVERS.items():
        assert services[name]["profiles"] == [profile]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    env_file = (DEPLOY / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=cpu$", env_file, flags=re.MULTILINE), "the CPU server must be the default"
    used = {source for s in services.values() for source in _mounts(s).values() if not source.startswith(".")}
    assert used == set(compose["volumes"]), "every named volume is declared, and every declared one is used"
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port} is published beyond the host's loopback"


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_server_builds_from_the_repository_dockerfile(compose: dict[str, Any], name: str) -> None:
    build = compose["services"][name]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert build["target"] in _dockerfile_targets(), (
        f"{name} builds Dockerfile target {build['target']!r}, which the Dockerfile does not define "
        f"(it has {sorted(_dockerfile_targets())})"
    )


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_server_environment_is_a_valid_config(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    cfg = _server_config(service)
    assert cfg.backbone.device == SERVERS[name][1]
    assert cfg.server.host == "0.0.0.0" and cfg.server.metrics_host == "0.0.0.0"
    assert cfg.server.auth_token == "", "no token unless EMBEDSERVE_SERVER_AUTH_TOKEN is set"
    assert _mounts(service)[str(cfg.data_dir)] == "embedserve-data", "the data directory is on the volume"
    published = {int(str(p).rsplit(":", 1)[1]) for p in service["ports"]}
    assert published == {cfg.server.port, cfg.server.metrics_port}
    assert "embedserve" in service["networks"]["default"]["aliases"]
    stop = int(str(service["stop_grace_period"]).rstrip("s"))
    assert stop > ServerConfig().grace_seconds, "compose must wait longer than the server's drain"


def test_prometheus_scrapes_the_server_and_mounts_its_config(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    mounts = _mounts(service)
    config_flag = next(a for a in service["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    assert (COMPOSE.parent / mounts[str(config_path.parent)]).resolve() == PROMETHEUS_CONFIG.parent
    assert config_path.name == PROMETHEUS_CONFIG.name
    metrics_port = _server_config(compose["services"]["embedserve"]).server.metrics_port
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    targets = [t for c in jobs["embedserve"]["static_configs"] for t in c["targets"]]
    assert targets == [f"embedserve:{metrics_port}"]
    assert jobs["embedserve"].get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisions_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    mounts = _mounts(service)
    provisioning = (COMPOSE.parent / mounts["/etc/grafana/provisioning"]).resolve()
    assert DATASOURCES.is_relative_to(provisioning) and DASHBOARD_PROVIDERS.is_relative_to(provisioning)
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (COMPOSE.parent / mounts[dashboards_dir]).resolve() == DASHBOARD.parent
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(dashboards_dir) and Path(home).name == DASHBOARD.name
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090", "Prometheus's service name and port in compose"
    assert "127.0.0.1:9090:9090" in compose["services"]["prometheus"]["ports"]
    assert {p["datasource"]["uid"] for p in dashboard()["panels"] if p["type"] != "row"} == {source["uid"]}
