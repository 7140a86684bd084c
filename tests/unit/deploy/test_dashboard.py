"""The provisioned Grafana dashboard: every panel has a query on the provisioned datasource, the layout holds, and
the panels the operators asked for are there. That every query's metric exists is checked on a live server
(tests/e2e/test_deploy_metrics.py); that every query parses, by promtool (test_prometheus.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.deploy.deploy_files import (
    DATASOURCES,
    dashboard,
    dashboard_panels,
    load_yaml,
    read_promql,
)


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return dashboard()


def _datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


def test_dashboard_identity(dash: dict[str, Any]) -> None:
    assert dash["uid"] == "embedserve" and dash["title"] == "embedserve"
    assert isinstance(dash["schemaVersion"], int) and dash["panels"]


def test_every_panel_has_a_query_on_the_provisioned_datasource(dash: dict[str, Any]) -> None:
    uid = _datasource_uid()
    panels = list(dashboard_panels(dash))
    assert len(panels) >= 12
    for panel in panels:
        title = panel.get("title")
        assert title and panel.get("description"), f"panel {panel.get('id')} needs a title and a description"
        assert panel["datasource"]["uid"] == uid, f"{title!r} uses datasource {panel['datasource']}"
        targets = panel.get("targets", [])
        assert targets, f"panel {title!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), f"{title!r} repeats a refId"
        for target in targets:
            assert target.get("expr", "").strip(), f"{title!r} target {target.get('refId')} has an empty query"
            assert target.get("datasource", panel["datasource"])["uid"] == uid
            assert read_promql(target["expr"]).metrics, f"{title!r} target {target['refId']} names no metric"
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == uid


def test_panel_ids_are_unique_and_the_grid_does_not_overlap(dash: dict[str, Any]) -> None:
    every = list(dash["panels"])
    ids = [p["id"] for p in every]
    assert len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in every:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{panel['title']!r} is off the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


_LATENCY = "embedserve_request_duration_seconds_bucket"
REQUIRED = {
    # what the operators asked for: (metric, the labels it must be split by, a function the query must use)
    "throughput": ("embedserve_images_total", set(), "rate("),
    "requests by method": ("embedserve_requests_total", {"method"}, "rate("),
    "p50 latency per method": (_LATENCY, {"method", "le"}, "histogram_quantile(0.5"),
    "p99 latency per method": (_LATENCY, {"method", "le"}, "histogram_quantile(0.99"),
    "queue depth": ("embedserve_queue_depth", set(), ""),
    "queue wait": ("embedserve_queue_wait_seconds_bucket", {"le"}, "histogram_quantile(0.99"),
    "batch size": ("embedserve_batch_size_sum", set(), "rate("),
    "errors by code": ("embedserve_requests_total", {"code"}, "rate("),
    "images by outcome": ("embedserve_images_total", {"outcome"}, "rate("),
    "stage durations": ("embedserve_stage_duration_seconds_bucket", {"stage", "le"}, "histogram_quantile(0.99"),
    "index vectors": ("embedserve_index_vectors", {"collection"}, ""),
    "search latency": ("embedserve_index_search_duration_seconds_bucket", {"le"}, "histogram_quantile(0.99"),
    "WAL fsync latency": ("embedserve_wal_fsync_duration_seconds_bucket", {"le"}, "histogram_quantile(0.99"),
    "GPU memory": ("embedserve_gpu_memory_bytes", {"kind"}, ""),
    "serving": ("embedserve_serving", set(), ""),
}


@pytest.mark.parametrize("topic", sorted(REQUIRED))
def test_the_dashboard_shows(dash: dict[str, Any], topic: str) -> None:
    metric, labels, function = REQUIRED[topic]
    for panel in dashboard_panels(dash):
        for target in panel["targets"]:
            found = read_promql(target["expr"])
            if metric in found.metrics and labels <= found.grouping and function in target["expr"]:
                return
    pytest.fail(f"no panel shows {topic}: a query of {metric} by {sorted(labels)} using {function or 'the value'}")
