"""Label values that the dashboard and the alert rules match on are values the server can emit (a typo such as
`outcome="reject"` would match nothing and never alert), and the dashboard selects servers by job and instance."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool

from service.api.clusterer import SERVICE_NAME as CLUSTER_SERVICE
from service.api.reflection import SERVICE_NAMES as REFLECTION_SERVICES
from service.api.server import SERVICE_NAME as EMBED_SERVICE
from service.metrics import IMAGE_OUTCOMES, STAGES
from tests.unit.deploy.deploy_files import (
    PROMETHEUS_CONFIG,
    dashboard,
    dashboard_queries,
    load_yaml,
    read_promql,
    rule_queries,
)

_SERVICES = (EMBED_SERVICE, CLUSTER_SERVICE, "grpc.health.v1.Health", *REFLECTION_SERVICES)


def _methods() -> set[str]:
    pool = descriptor_pool.Default()
    return {m.name for name in _SERVICES for m in pool.FindServiceByName(name).methods} | {"other"}


def _known_values() -> dict[str, set[str]]:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    return {
        "method": _methods(),
        "code": {code.name for code in grpc.StatusCode},
        "outcome": set(IMAGE_OUTCOMES),
        "stage": set(STAGES),
        "job": jobs,
    }


def test_the_method_names_come_from_the_services() -> None:
    assert {"Embed", "EmbedStream", "Neighbors", "Cluster", "Check", "Watch", "ServerReflectionInfo"} <= _methods()


@pytest.mark.parametrize(("where", "expr"), dashboard_queries(dashboard()) + rule_queries())
def test_matched_label_values_exist(where: str, expr: str) -> None:
    known = _known_values()
    for name, matchers in read_promql(expr).selectors:
        for m in matchers:
            values = m.literal_values()
            if m.label in known and values is not None:
                unknown = set(values) - known[m.label]
                assert not unknown, f"{where}: {name}{{{m.label}{m.op}...}} names unknown values {sorted(unknown)}"


@pytest.mark.parametrize(("where", "expr"), dashboard_queries(dashboard()))
def test_panels_select_the_servers_by_the_job_variable(where: str, expr: str) -> None:
    """Every server series on the dashboard is filtered by `$job` (the scrape job differs outside deploy/), and
    panels by `$instance` too, so that a Prometheus scraping other things never mixes them in."""
    for name, matchers in read_promql(expr).selectors:
        if name.startswith(("embedserve_", "process_")):
            by = {m.label: m for m in matchers}
            assert "job" in by and by["job"].value == "$job", f'{where}: {name} is not filtered by job=~"$job"'
            if where.startswith("panel"):
                assert by["instance"].value == "$instance", f"{where}: {name} is not filtered by $instance"


def test_the_job_variable_defaults_to_the_scraped_job() -> None:
    (job,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "job"]
    assert job["current"]["value"] in _known_values()["job"]
