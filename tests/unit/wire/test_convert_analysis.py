"""Round trips of the issue-15 additions to the Clusterer messages: Outliers, filter method and reason, cluster
warnings, the density metric and skip_pca."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidRequestError
from service.types import ClusterParams, ClusterQuery, FilterQuery, FilterResult, OutlierQuery, OutlierResult
from service.wire import convert
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb


def _reparse(message: object) -> object:
    out = type(message)()
    out.ParseFromString(message.SerializeToString())  # type: ignore[attr-defined]
    return out


@pytest.mark.parametrize(
    "query", [OutlierQuery(collection="oct"), OutlierQuery(collection="c", keys=["a", "b", "c"], k=7, top=2)]
)
def test_outlier_query_round_trip(query: OutlierQuery) -> None:
    request = _reparse(convert.outlier_query_to_proto(query))
    assert convert.outlier_query_from_proto(request) == query  # type: ignore[arg-type]


def test_outlier_result_round_trip() -> None:
    r = OutlierResult(
        keys=["b", "a"],
        kth_distance=np.array([0.9, 0.1]),
        lof=np.array([2.5, 1.0]),
        score=np.array([1.0, 0.0]),
        k=5,
        n=10,
        paths=["/x/b.png", "/x/a.png"],
    )
    back = convert.outlier_result_from_proto(_reparse(convert.outlier_result_to_proto(r)))  # type: ignore[arg-type]
    assert back.keys == r.keys and back.paths == r.paths and (back.k, back.n) == (5, 10)
    for name in ("kth_distance", "lof", "score"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))


@pytest.mark.parametrize("method", ["auto", "distance", "cluster"])
def test_filter_method_and_reason_round_trip(method: str) -> None:
    query = FilterQuery(collection="c", example_keys=["a"], method=method)  # type: ignore[arg-type]
    assert convert.filter_query_from_proto(_reparse(convert.filter_query_to_proto(query))) == query  # type: ignore[arg-type]
    result = FilterResult(remove=["a"], keep=["b"], method="cluster", removed_clusters=[1], reason="because")
    assert convert.filter_result_from_proto(_reparse(convert.filter_result_to_proto(result))) == result  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="filter method"):
        convert.filter_query_from_proto(cpb.FilterRequest(collection="c", method="nearest"))


@pytest.mark.parametrize("pca_dim", [None, 0, 6])
def test_metric_and_pca_modes_round_trip(pca_dim: int | None) -> None:
    params = ClusterParams(algorithm="hdbscan", metric="euclidean", pca_dim=pca_dim)
    query = ClusterQuery(collection="c", params=params)
    request = _reparse(convert.cluster_query_to_proto(query))
    assert convert.cluster_query_from_proto(request) == query  # type: ignore[arg-type]
    assert request.skip_pca == (pca_dim == 0)  # type: ignore[attr-defined]
