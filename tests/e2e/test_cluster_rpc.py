"""The Clusterer service over a real grpc.aio server on loopback, backed by an in-memory store."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from sklearn.datasets import make_blobs

from service.analysis.cluster import ClusterParams, backend_available
from service.analysis.report import SECTIONS, ReportData, render_report
from service.api.clusterer import add_clusterer
from service.client import ClusterClient, RemoteError
from service.errors import EmbedServeError
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb


class UnknownCollectionError(EmbedServeError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Items:
    keys: list[str]
    vectors: np.ndarray
    attributes: list[dict[str, str]]


@dataclass
class FakeStore:
    collections: dict[str, Items]
    delay: float = 0.0

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> Items:
        time.sleep(self.delay)
        if collection not in self.collections:
            raise UnknownCollectionError(f"no collection named {collection!r}")
        items = self.collections[collection]
        if not keys:
            return items
        index = {k: i for i, k in enumerate(items.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise UnknownCollectionError(f"unknown keys: {missing[:3]}")
        rows = [index[k] for k in keys]
        return Items(list(keys), items.vectors[rows], [items.attributes[i] for i in rows])


@dataclass
class FakeMetrics:
    runs: list[tuple[str, str, float]] = field(default_factory=list)

    def observe_cluster(self, algorithm: str, backend: str, seconds: float) -> None:
        self.runs.append((algorithm, backend, seconds))


@dataclass
class FakeEmbedServer:
    index: FakeStore
    metrics: FakeMetrics


def _blobs() -> Items:
    x, y = make_blobs(n_samples=200, centers=4, n_features=12, cluster_std=0.5, center_box=(-10, 10), random_state=4)
    keys = [f"img-{i:03d}" for i in range(200)]
    attrs = [{"label": f"class{v}", "patient": str(i // 4)} for i, v in enumerate(y)]
    return Items(keys, x.astype(np.float32), attrs)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeEmbedServer]]:
    embed_server = FakeEmbedServer(FakeStore({"blobs": _blobs()}), FakeMetrics())
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        server = grpc.aio.server()
        add_clusterer(server, embed_server)
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    ready.wait(30)
    yield f"127.0.0.1:{holder['port']}", embed_server
    asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_cluster_kmeans_with_ground_truth(served: tuple[str, FakeEmbedServer]) -> None:
    target, embed_server = served
    with ClusterClient(target) as client:
        c = client.cluster("blobs", ClusterParams(k=4), ground_truth_attribute="label")
    r = c.result
    assert len(c.keys) == len(r.labels) == len(r.noise) == 200
    assert r.algorithm == "kmeans" and r.backend in ("faiss", "sklearn", "torch", "cuml") and r.seconds > 0
    assert r.k == 4 and set(r.labels.tolist()) == {0, 1, 2, 3} and not any(r.noise)
    assert r.metrics["accuracy"] == 1.0 and r.metrics["nmi"] == pytest.approx(1.0)
    assert r.centers is not None and r.centers.shape == (4, 12) and r.centers.dtype == np.float32
    assert r.table is not None
    assert list(r.table.classes) == ["class0", "class1", "class2", "class3"] and r.table.counts.sum() == 200
    assert embed_server.metrics.runs[-1][0] == "kmeans"


def test_cluster_subset_pca_dbscan_and_details(served: tuple[str, FakeEmbedServer]) -> None:
    target, _ = served
    keys = [f"img-{i:03d}" for i in range(0, 200, 2)]
    params = ClusterParams(algorithm="dbscan", min_samples=4, pca_dim=5)
    with ClusterClient(target) as client:
        c = client.cluster("blobs", params, keys=keys, ground_truth_attribute="label", include_details=True)
    r = c.result
    assert c.keys == keys and r.algorithm == "dbscan"
    assert r.eps is not None and r.eps > 0 and r.k_distance is not None and len(r.k_distance) == 100
    assert r.centers is None
    assert c.projection is not None and c.projection.shape == (100, 2)
    assert c.center_distance is not None and len(c.center_distance) == 100
    assert len(r.sweep) == 9 and c.truth is not None and len(c.truth) == 100 and c.truth[0].startswith("class")
    data = ReportData.from_clustering(c)
    page = render_report(data)
    for section in SECTIONS:
        assert f'id="{section}"' in page


def test_medoid_keys(served: tuple[str, FakeEmbedServer]) -> None:
    target, _ = served
    with ClusterClient(target) as client:
        c = client.cluster("blobs", ClusterParams(algorithm="kmedoids", k=4))
    assert len(c.medoid_keys) == 4 and c.result.centers is not None and c.result.centers.shape[0] == 4
    assert all(c.result.labels[c.keys.index(k)] == i for i, k in enumerate(c.medoid_keys))


def test_errors_map_to_status_codes(served: tuple[str, FakeEmbedServer]) -> None:
    target, _ = served
    with ClusterClient(target) as client:
        with pytest.raises(RemoteError) as e:
            client.cluster("nope", ClusterParams(k=4))
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details
        with pytest.raises(RemoteError) as e:
            client.cluster_request(
                cpb.ClusterRequest(collection="blobs", algorithm=cpb.CLUSTER_ALGORITHM_DBSCAN, backend="faiss")
            )
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "faiss" in e.value.details
        with pytest.raises(RemoteError) as e:
            client.cluster("blobs", ClusterParams(k=4), ground_truth_attribute="colour")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "colour" in e.value.details
        if not backend_available("cuml")[0]:
            with pytest.raises(RemoteError) as e:
                client.cluster("blobs", ClusterParams(k=4, backend="cuml"))
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "cuML" in e.value.details


def test_deadline_stops_the_run_between_steps(served: tuple[str, FakeEmbedServer]) -> None:
    target, embed_server = served
    embed_server.index.delay = 0.6  # the fetch alone outlasts the deadline
    before = len(embed_server.metrics.runs)
    try:
        with ClusterClient(target) as client, pytest.raises(RemoteError) as e:
            client.cluster("blobs", ClusterParams(k=None, k_max=30), timeout=0.3)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.5)  # the worker would have finished the sweep by now had it not stopped
        assert len(embed_server.metrics.runs) == before
    finally:
        embed_server.index.delay = 0.0


def test_probe_and_filter(served: tuple[str, FakeEmbedServer]) -> None:
    target, _ = served
    with ClusterClient(target) as client:
        p = client.probe("blobs", "label", group_attribute="patient", folds=4)
        assert p.accuracy == 1.0 and p.folds == 4 and p.classifier == "logreg" and p.confusion.sum() == 200
        knn = client.probe("blobs", "label", classifier="knn")
        assert knn.classifier == "knn" and knn.accuracy == 1.0
        items = _blobs()
        class0 = [k for k, a in zip(items.keys, items.attributes, strict=True) if a["label"] == "class0"]
        f = client.filter(
            "blobs",
            example_keys=class0[:2],
            by_cluster=True,
            params=ClusterParams(k=4),
            unwanted_attribute="label",
            unwanted_values=["class0"],
        )
        assert sorted(f.remove) == sorted(class0) and f.method == "cluster" and len(f.removed_clusters) == 1
        assert f.precision == 1.0 and f.recall == 1.0 and f.quality == pytest.approx(1.0)
        d = client.filter("blobs", example_keys=class0[:5], max_distance=100.0)
        assert d.method == "distance" and d.threshold == 100.0 and len(d.remove) == 200
        with pytest.raises(RemoteError) as e:
            client.filter("blobs", example_keys=["missing"])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_outliers_rank_a_planted_far_item_first(served: tuple[str, FakeEmbedServer]) -> None:
    target, _ = served
    items = _blobs()
    with ClusterClient(target) as client:
        r = client.outliers("blobs", top=5)
        assert len(r.keys) == 5 and r.n == len(items.keys) and r.k >= 5
        assert (np.diff(r.score) <= 0).all() and (r.lof > 0).all()
        sub = client.outliers("blobs", keys=items.keys[:40], k=3)
        assert sorted(sub.keys) == sorted(items.keys[:40]) and sub.k == 3
        with pytest.raises(RemoteError) as e:
            client.outliers("blobs", keys=items.keys[:40], k=40)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
