"""Every metric that deploy/'s dashboard and alert rules name is on a live server's /metrics, with the labels they use.

A real server (Embedder and Clusterer, the shared CPU engine) on loopback port 0 with its metrics port on port 0 gets a
little of every kind of traffic (stores, a bad image, a search, a clustering), then /metrics is read over HTTP and
parsed with prometheus_client's parser. /healthz and /readyz, which the Kubernetes probes use, are read too.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.analysis.cluster import ClusterParams
from service.api.clusterer import SERVICE_NAME as CLUSTER_SERVICE
from service.api.clusterer import add_clusterer
from service.client import ClusterClient
from service.client.sync import EmbedClient
from service.embedding.engine import Engine
from service.metrics import Metrics
from service.types import NeighborQuery
from tests.e2e.conftest import RunningServer, make_config
from tests.unit.deploy.deploy_files import (
    PROMETHEUS_SYNTHETIC,
    TARGET_LABELS,
    dashboard,
    dashboard_queries,
    exposed_series,
    read_promql,
    rule_queries,
)

pytestmark = pytest.mark.timeout(300)


def _exposed(text: str) -> dict[str, dict[str, set[str]] | None]:
    """The series of the live server's exposition, and the GPU ones this CPU server cannot have.

    A model on a GPU adds series of `embedserve_gpu_memory_bytes` (declared everywhere) and, with NVML,
    `embedserve_gpu_utilization_ratio` (registered only then): they are read from a `Metrics` that tracks probes the
    way the server does on a GPU.
    """
    exposed = exposed_series(text_string_to_metric_families(text))
    gpu = Metrics()
    gpu.track_gpu_memory(lambda: (1, 2))
    gpu.track_gpu_utilization(lambda: 0.5)
    for name, labels in exposed_series(text_string_to_metric_families(gpu.exposition().decode())).items():
        if name.startswith("embedserve_gpu_") and exposed.get(name) is None:
            exposed[name] = labels
    return exposed


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def live(
    engine: Engine, oct_images: list[tuple[str, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, str]]:
    """A server after some traffic, and the text of its /metrics."""
    cfg = make_config(
        data_dir=str(tmp_path_factory.mktemp("deploy-data")),
        server__metrics_port=0,
        index__snapshot_every_records=1,  # a snapshot after the first store: snapshot age has a series
    )
    server = RunningServer(cfg, engine, extra_servicers=[add_clusterer], extra_service_names=[CLUSTER_SERVICE])
    try:
        with EmbedClient(server.target) as client:
            client.wait_until_serving(120)
            results = client.embed([*oct_images[:4], ("not-an-image", b"no jpeg here")], store=True)
            assert [r.ok for r in results] == [True] * 4 + [False]
            client.embed(oct_images[4:8], store=True)
            client.neighbors([NeighborQuery(key=oct_images[0][0])], k=3)
            client.model_info()
        with ClusterClient(server.target) as cluster:
            cluster.cluster("default", ClusterParams(k=2))
        assert server.server.metrics_port is not None
        status, text = _get(f"http://127.0.0.1:{server.server.metrics_port}/metrics")
        assert status == 200
        yield server, text
    finally:
        server.stop()


def _queries() -> list[tuple[str, str]]:
    return dashboard_queries(dashboard()) + rule_queries()


def test_every_metric_of_the_dashboard_and_rules_is_exposed(live: tuple[RunningServer, str]) -> None:
    _, text = live
    exposed = _exposed(text)
    missing = []
    for where, expr in _queries():
        for name in sorted(read_promql(expr).metrics - PROMETHEUS_SYNTHETIC):
            if name not in exposed:
                missing.append(f"{where}: {name}")
    assert not missing, "metrics named in deploy/ that the server does not expose:\n" + "\n".join(missing)


def test_every_selected_label_is_on_its_metric(live: tuple[RunningServer, str]) -> None:
    """Labels in `metric{...}` are the metric's own (or Prometheus's job/instance); grouping labels belong to one of
    the query's metrics. The traffic gives every metric a series, so that its labels can be read."""
    _, text = live
    exposed = _exposed(text)
    problems = []
    for where, expr in _queries():
        found = read_promql(expr)
        known = set(TARGET_LABELS)
        for name in found.metrics - PROMETHEUS_SYNTHETIC:
            labels = exposed.get(name)
            if labels is None:
                problems.append(f"{where}: {name} has no series after the traffic")
                continue
            known |= set(labels)
        for name, matchers in found.selectors:
            labels = exposed.get(name)
            if labels is None:
                continue
            for m in matchers:
                if m.label not in labels and m.label not in TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {m.label!r} (it has {sorted(labels)})")
        for label in sorted(found.grouping - known):
            problems.append(f"{where}: no metric of the query has the label {label!r}")
    assert not problems, "\n".join(problems)


def test_the_traffic_shows_in_the_series_the_dashboard_plots(live: tuple[RunningServer, str]) -> None:
    server, _ = live
    assert server.sample("embedserve_images_total", {"outcome": "ok"}) == 8
    assert server.sample("embedserve_images_total", {"outcome": "invalid_image"}) == 1
    assert server.sample("embedserve_requests_total", {"method": "Embed", "code": "OK"}) == 2
    assert server.sample("embedserve_request_duration_seconds_count", {"method": "Neighbors"}) == 1
    assert server.sample("embedserve_index_search_duration_seconds_count") >= 1
    assert server.sample("embedserve_wal_fsync_duration_seconds_count") >= 1
    assert server.sample("embedserve_index_vectors", {"collection": "default"}) == 8
    assert server.sample("embedserve_snapshot_age_seconds", {"collection": "default"}) >= 0
    assert server.sample("embedserve_serving") == 1


def test_probe_endpoints_of_the_kubernetes_manifest_answer(live: tuple[RunningServer, str]) -> None:
    server, _ = live
    base = f"http://127.0.0.1:{server.server.metrics_port}"
    assert _get(base + "/healthz")[0] == 200
    assert _get(base + "/readyz")[0] == 200
