"""The analysis use case (cluster, probe, filter over a vector source) against calling `service.analysis` directly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from service.analysis import evaluate
from service.analysis.cluster import cluster
from service.app.analysis import Analysis
from service.errors import ClusterRequestError, CollectionNotFoundError, NoIndexError
from service.types import ClusterParams, ClusterQuery, FetchedItems, FilterQuery, ProbeQuery


class DictSource:
    def __init__(self, items: FetchedItems) -> None:
        self.items = items

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems:
        if collection != "blobs":
            raise CollectionNotFoundError(f"no collection {collection!r}")
        if not keys:
            return self.items
        rows = [self.items.keys.index(k) for k in keys]
        return FetchedItems(list(keys), self.items.vectors[rows], [self.items.attributes[i] for i in rows])


@pytest.fixture(scope="module")
def items() -> FetchedItems:
    x, y = make_blobs(n_samples=120, centers=3, n_features=6, cluster_std=0.6, random_state=1)
    keys = [f"k{i:03d}" for i in range(120)]
    attrs = [{"label": f"c{v}", "patient": str(i // 4)} for i, v in enumerate(y)]
    return FetchedItems(keys, x.astype(np.float32), attrs)


def test_cluster_matches_a_direct_call(items: FetchedItems) -> None:
    runs: list[tuple[str, str, float]] = []
    analysis = Analysis(DictSource(items), observe=lambda a, b, s: runs.append((a, b, s)))
    params = ClusterParams(k=3, backend="sklearn", curves=True)
    got = analysis.cluster(
        ClusterQuery(collection="blobs", params=params, ground_truth_attribute="label", include_details=True)
    )
    truth = [a["label"] for a in items.attributes]
    want = cluster(items.vectors, params, truth=truth)
    np.testing.assert_array_equal(got.result.labels, want.labels)
    assert got.result.metrics == pytest.approx(want.metrics, nan_ok=True)
    assert got.keys == items.keys and got.truth == truth and got.paths == [""] * 120
    assert got.projection is not None and got.projection.shape == (120, 2)
    np.testing.assert_allclose(got.projection, evaluate.projection_2d(want.features, seed=params.seed), atol=1e-5)
    assert runs and runs[-1][0] == "kmeans"
    subset = analysis.cluster(ClusterQuery(collection="blobs", params=params, keys=items.keys[::2]))
    np.testing.assert_array_equal(subset.result.labels, cluster(items.vectors[::2], params).labels)


def test_probe_and_filter_match_direct_calls(items: FetchedItems) -> None:
    analysis = Analysis(DictSource(items))
    truth = [a["label"] for a in items.attributes]
    groups = [a["patient"] for a in items.attributes]
    got = analysis.probe(ProbeQuery(collection="blobs", target_attribute="label", group_attribute="patient", folds=3))
    want = evaluate.run_probe(items.vectors, truth, folds=3, groups=groups, group_name="patient")
    assert (got.accuracy, got.fold_accuracy, got.classes) == (want.accuracy, want.fold_accuracy, want.classes)
    np.testing.assert_array_equal(got.confusion, want.confusion)

    examples = [k for k, t in zip(items.keys, truth, strict=True) if t == "c0"][:3]
    unwanted = [k for k, t in zip(items.keys, truth, strict=True) if t == "c0"]
    by_distance = analysis.filter(
        FilterQuery(
            collection="blobs",
            example_keys=examples,
            method="distance",
            unwanted_attribute="label",
            unwanted_values=["c0"],
        )
    )
    direct = evaluate.filter_by_examples(items.keys, items.vectors, examples, unwanted=unwanted)
    assert (by_distance.remove, by_distance.threshold, by_distance.quality) == (
        direct.remove,
        direct.threshold,
        direct.quality,
    )
    params = ClusterParams(k=3, backend="sklearn")
    query = FilterQuery(collection="blobs", example_keys=examples, by_cluster=True, cluster=params)
    by_cluster = analysis.filter(query)
    labels = cluster(items.vectors, params).labels
    ids = evaluate.example_clusters(items.keys, labels, examples)
    assert by_cluster.removed_clusters == ids
    assert by_cluster.remove == evaluate.filter_by_clusters(items.keys, labels, ids).remove


def test_bad_requests_raise_typed_errors(items: FetchedItems) -> None:
    analysis = Analysis(DictSource(items))
    with pytest.raises(ClusterRequestError, match="colour"):
        analysis.cluster(ClusterQuery(collection="blobs", ground_truth_attribute="colour"))
    with pytest.raises(ClusterRequestError, match="not in the data"):
        analysis.filter(FilterQuery(collection="blobs", example_keys=["missing"]))
    with pytest.raises(ClusterRequestError, match="single example"):  # a ValueError of the filter
        analysis.filter(FilterQuery(collection="blobs", example_keys=items.keys[:1], method="distance"))
    one_class = FetchedItems(items.keys, items.vectors, [{"label": "same"} for _ in items.keys])
    with pytest.raises(ClusterRequestError, match="two classes"):  # a ValueError of the probe
        Analysis(DictSource(one_class)).probe(ProbeQuery(collection="blobs", target_attribute="label"))
    with pytest.raises(ClusterRequestError, match="name the collection"):
        analysis.probe(ProbeQuery(collection="", target_attribute="label"))
    with pytest.raises(CollectionNotFoundError):
        analysis.cluster(ClusterQuery(collection="nope"))
    with pytest.raises(NoIndexError):
        Analysis(None).cluster(ClusterQuery(collection="blobs"))
