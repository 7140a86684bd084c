"""Round trips through `service.wire.convert`: domain -> proto -> domain, and proto -> domain -> proto, per message.

The references are independent of the code under test: the records we started from, numpy decoding of the raw
bytes on the wire, and the protobuf messages' own serialisation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.errors import (
    ImageError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidRequestError,
    UnreadableImageError,
    UnsupportedImageError,
)
from service.types import (
    ClassReport,
    Clustering,
    ClusterParams,
    ClusterQuery,
    ClusterResult,
    CollectionInfo,
    Contingency,
    EmbedBatch,
    EmbedOutcome,
    FetchedItems,
    FilterQuery,
    FilterResult,
    ImageData,
    ModelInfo,
    Neighbor,
    NeighborQuery,
    NeighborsSearch,
    ProbeQuery,
    ProbeResult,
    QueryError,
    QueryNeighbors,
    SweepPoint,
)
from service.wire import convert
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb

RNG = np.random.default_rng(7)


def plain(value: Any) -> Any:
    """A structure np.testing.assert_equal can compare: dataclasses as dicts (with their type), errors by
    type/reason/message, arrays kept (dtype checked separately where it matters)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__} | {
            f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, ImageError):
        return ("error", type(value).__name__, value.reason, value.message)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def assert_same(a: Any, b: Any) -> None:
    np.testing.assert_equal(plain(a), plain(b))


def unit(n: int, dim: int) -> np.ndarray:
    x = RNG.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reparse(message: Any) -> Any:
    """The message after a trip through its binary encoding (what the peer sees)."""
    return type(message).FromString(message.SerializeToString())


def assert_names_real_values(message: str, enum: Any, *expected: str) -> None:
    """Every enum-looking word of an error message is a value of `enum` (as the .proto spells it)."""
    named = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", message))
    assert set(expected) <= named, message
    assert named <= set(enum.keys()), f"{message!r} names {sorted(named - set(enum.keys()))}, not values of the enum"


EMBED_REQUESTS = [
    pytest.param(convert.embed_batch_to_proto, pb.EmbedRequest, id="Embed"),
    pytest.param(convert.embed_batch_to_stream_proto, pb.EmbedStreamRequest, id="EmbedStream"),
]
EMBED_RESPONSES = [
    pytest.param(convert.embed_response_to_proto, pb.EmbedResponse, id="Embed"),
    pytest.param(convert.embed_stream_response_to_proto, pb.EmbedStreamResponse, id="EmbedStream"),
]


# -- Embed ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("to_proto", "message_type"), EMBED_REQUESTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embed_batch_round_trip(dtype: str, to_proto: Callable[[EmbedBatch], Any], message_type: type) -> None:
    batch = EmbedBatch(
        images=[ImageData("a", b"\xff\xd8jpeg", {"label": "DME", "path": "/x/a.jpeg"}), ImageData("b", b"png", {})],
        dtype=dtype,  # type: ignore[arg-type]
        return_vectors=False,
        store=True,
        collection="oct",
    )
    request = reparse(to_proto(batch))
    assert type(request) is message_type
    assert request.vector_dtype == (pb.VECTOR_DTYPE_FLOAT16 if dtype == "float16" else pb.VECTOR_DTYPE_FLOAT32)
    assert [i.data for i in request.images] == [b"\xff\xd8jpeg", b"png"]
    assert_same(convert.embed_batch_from_proto(request), batch)
    assert to_proto(convert.embed_batch_from_proto(request)) == request


def test_embed_and_stream_requests_are_the_same_on_the_wire() -> None:
    batch = EmbedBatch(images=[ImageData("a", b"x", {"label": "DME"})], dtype="float16", store=True, collection="c")
    unary = convert.embed_batch_to_proto(batch).SerializeToString(deterministic=True)
    assert convert.embed_batch_to_stream_proto(batch).SerializeToString(deterministic=True) == unary


@pytest.mark.parametrize(("to_proto", "message_type"), EMBED_REQUESTS)
def test_embed_request_defaults_and_unknown_dtype(to_proto: Callable[[EmbedBatch], Any], message_type: Any) -> None:
    batch = convert.embed_batch_from_proto(message_type(images=[pb.Image(key="k", data=b"x")]))
    assert batch.return_vectors is True and batch.dtype == "float32" and not batch.store
    # UNSPECIFIED, sent explicitly or left out, is float32 (the default before the enum had a zero value of its own).
    unspecified = message_type(vector_dtype=pb.VECTOR_DTYPE_UNSPECIFIED)
    assert unspecified.SerializeToString() == b""
    assert convert.embed_batch_from_proto(unspecified).dtype == "float32"
    with pytest.raises(InvalidRequestError, match="vector_dtype") as caught:
        convert.embed_batch_from_proto(message_type(vector_dtype=7))
    assert_names_real_values(str(caught.value), pb.VectorDtype, "VECTOR_DTYPE_FLOAT32", "VECTOR_DTYPE_FLOAT16")


def test_a_result_without_dtype_is_float32() -> None:
    vector = unit(1, 4)[0]
    response = pb.EmbedResponse(results=[pb.Result(key="k", dim=4, vector=vector.astype("<f4").tobytes())])
    assert response.results[0].dtype == pb.VECTOR_DTYPE_UNSPECIFIED
    (result,) = convert.embed_results_from_proto(response)
    assert result.vector is not None
    np.testing.assert_array_equal(result.vector, vector)


def _outcomes(dim: int) -> tuple[list[str], list[EmbedOutcome]]:
    errors: list[ImageError] = [
        InvalidImageError("not an image"),
        UnsupportedImageError("CMYK"),
        ImageTooLargeError("too many pixels"),
        UnreadableImageError("permission denied"),
    ]
    odd = ImageError("from a newer server")
    odd.reason = "some_future_reason"
    errors.append(odd)
    vectors = unit(3, dim)
    outcomes = [EmbedOutcome(vector=v) for v in vectors] + [EmbedOutcome(error=e) for e in errors]
    keys = [f"img-{i}" for i in range(len(outcomes))]
    return keys, outcomes


@pytest.mark.parametrize(("to_proto", "message_type"), EMBED_RESPONSES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embed_response_round_trip_with_every_image_error(dtype: str, to_proto: Any, message_type: type) -> None:
    dim = 16
    keys, outcomes = _outcomes(dim)
    batch = EmbedBatch(images=[ImageData(k, b"") for k in keys], dtype=dtype)  # type: ignore[arg-type]
    response = reparse(to_proto(batch, outcomes, dim))
    assert type(response) is message_type
    wire = "<f2" if dtype == "float16" else "<f4"
    results = convert.embed_results_from_proto(response)
    assert [r.key for r in results] == keys
    for raw, result, outcome in zip(response.results, results, outcomes, strict=True):
        assert raw.dim == dim
        if outcome.error is not None:
            assert raw.error.code == 3 and raw.vector == b""
            assert result.vector is None and result.error is not None
            assert type(result.error) is type(outcome.error)
            assert (result.error.reason, result.error.message) == (outcome.error.reason, outcome.error.message)
        else:
            assert outcome.vector is not None and result.vector is not None and result.error is None
            assert len(raw.vector) == dim * np.dtype(wire).itemsize
            expected = outcome.vector.astype(wire).astype(np.float32)
            assert result.vector.dtype == np.float32
            np.testing.assert_array_equal(result.vector, expected)
            np.testing.assert_array_equal(np.frombuffer(raw.vector, wire), outcome.vector.astype(wire))
    # proto -> domain -> proto: the same message back.
    back = [EmbedOutcome(vector=r.vector, error=r.error) for r in results]
    assert to_proto(batch, back, dim) == response


def test_embed_response_without_vectors_and_a_truncated_vector() -> None:
    keys, outcomes = _outcomes(4)
    batch = EmbedBatch(images=[ImageData(k, b"") for k in keys], return_vectors=False)
    results = convert.embed_results_from_proto(convert.embed_response_to_proto(batch, outcomes, 4))
    assert all(r.vector is None for r in results)
    assert [r.ok for r in results] == [o.ok for o in outcomes]
    broken = pb.EmbedResponse(results=[pb.Result(key="k", dim=4, vector=b"\x00" * 12)])
    with pytest.raises(InvalidRequestError, match="'k'"):
        convert.embed_results_from_proto(broken)


def test_image_errors_round_trip() -> None:
    for error in (InvalidImageError("bad"), UnsupportedImageError("cmyk"), ImageTooLargeError("huge")):
        code, reason, message = convert.image_status(error)
        assert code == 3
        back = convert.image_error_from_status(code, reason, message)
        assert type(back) is type(error) and back.message == error.message
    unknown = convert.image_error_from_status(3, "some_future_reason", "m")
    assert unknown.reason == "some_future_reason"


# -- model and collections --------------------------------------------------------------------------------------


def test_model_info_round_trip() -> None:
    info = ModelInfo(
        backbone="efficientnet_lite0",
        embedding_dim=1280,
        input_size=224,
        precision="bfloat16",
        device="cuda:0",
        decode_backend="dali-gpu",
        resize="letterbox",
        pad="edge",
        version="1.2.3",
    )
    message = reparse(convert.model_info_to_proto(info))
    assert convert.model_info_from_proto(message) == info
    assert convert.model_info_to_proto(convert.model_info_from_proto(message)) == message


def test_collection_info_round_trip() -> None:
    info = CollectionInfo(
        name="oct",
        dim=1280,
        metric="cosine",
        index_type="ivf_pq",
        count=84_484,
        trained=True,
        bytes_on_disk=5 * 2**31,
        search_backend="faiss-cpu",
    )
    message = reparse(convert.collection_info_to_proto(info))
    assert message.bytes_on_disk == 5 * 2**31
    assert convert.collection_info_from_proto(message) == info
    assert convert.collection_info_to_proto(convert.collection_info_from_proto(message)) == message


@pytest.mark.parametrize("include_vectors", [True, False])
def test_items_pages_round_trip(include_vectors: bool) -> None:
    items = FetchedItems(
        keys=[f"k{i}" for i in range(5)],
        vectors=unit(5, 8),
        attributes=[{"label": str(i % 2)} for i in range(5)],
    )
    pages = [reparse(p) for p in convert.items_pages_to_proto(items, page_size=2, include_vectors=include_vectors)]
    assert [len(p.items) for p in pages] == [2, 2, 1] and all(p.dim == 8 for p in pages)
    back = [convert.items_from_proto(p) for p in pages]
    assert [k for b in back for k in b.keys] == items.keys
    assert [a for b in back for a in b.attributes] == items.attributes
    vectors = np.concatenate([b.vectors for b in back])
    if include_vectors:
        assert vectors.dtype == np.float32
        np.testing.assert_array_equal(vectors, items.vectors)
    else:
        assert vectors.shape == (5, 0)
    # proto -> domain -> proto
    again = convert.items_pages_to_proto(back[0], page_size=2, include_vectors=include_vectors)
    if include_vectors:
        assert list(again) == [pages[0]]


def test_items_pages_of_nothing() -> None:
    empty = FetchedItems([], np.zeros((0, 8), np.float32), [])
    pages = list(convert.items_pages_to_proto(empty, page_size=10, include_vectors=True))
    assert len(pages) == 1 and pages[0].dim == 8 and not pages[0].items
    assert convert.items_from_proto(pages[0]).keys == []
    with pytest.raises(InvalidRequestError):
        list(convert.items_pages_to_proto(empty, page_size=-1, include_vectors=True))


# -- Neighbors --------------------------------------------------------------------------------------------------


def test_neighbor_queries_round_trip() -> None:
    vector = unit(1, 6)[0]
    search = NeighborsSearch(
        queries=[NeighborQuery(key="scan-1"), NeighborQuery(vector=vector), NeighborQuery(image=b"jpeg")],
        k=3,
        collection="oct",
        filter="label == DME",
        exclude_self=True,
    )
    request = reparse(convert.neighbors_search_to_proto(search))
    assert [q.WhichOneof("kind") for q in request.queries] == ["key", "vector", "image"]
    np.testing.assert_array_equal(np.frombuffer(request.queries[1].vector, "<f4"), vector)
    assert_same(convert.neighbors_search_from_proto(request), search)
    assert convert.neighbors_search_to_proto(convert.neighbors_search_from_proto(request)) == request


def test_neighbor_query_errors_and_default_k() -> None:
    assert convert.neighbors_search_from_proto(pb.NeighborsRequest()).k == convert.DEFAULT_K
    with pytest.raises(InvalidRequestError, match="query 1 has no key"):
        convert.neighbors_search_from_proto(pb.NeighborsRequest(queries=[pb.Query(key="a"), pb.Query()]))
    with pytest.raises(InvalidRequestError, match="query 0"):
        convert.neighbors_search_from_proto(pb.NeighborsRequest(queries=[pb.Query(vector=b"\x00" * 6)]))


def test_neighbors_results_round_trip() -> None:
    results = [
        QueryNeighbors(
            [Neighbor("a", 0.5, {"label": "DME"}), Neighbor("b", 0.25, {})],
        ),
        QueryNeighbors([], QueryError(5, "key_not_found", "collection 'oct' has no item with key 'x'")),
        QueryNeighbors([]),
        QueryNeighbors([], QueryError(3, "invalid_image", "not an image")),
    ]
    response = reparse(convert.neighbors_to_proto(results, "cosine"))
    assert response.metric == "cosine"
    assert [r.HasField("error") for r in response.results] == [False, True, False, True]
    assert convert.neighbors_from_proto(response) == results
    assert convert.neighbors_to_proto(convert.neighbors_from_proto(response), "cosine") == response


# -- Matrix -----------------------------------------------------------------------------------------------------


def test_matrix_round_trips() -> None:
    assert convert.matrix_from_proto(convert.matrix_to_proto(None)) is None
    assert convert.matrix_to_proto(None) == cpb.Matrix()
    row = np.arange(7, dtype=np.float32)[None, :] / 3
    m = reparse(convert.matrix_to_proto(row))
    assert (m.rows, m.cols, len(m.data)) == (1, 7, 28)
    back = convert.matrix_from_proto(m)
    assert back is not None and back.dtype == np.float32 and back.shape == (1, 7)
    np.testing.assert_array_equal(back, row)
    # Every float32 bit pattern that is a number survives (no detour through float64 text or rounding).
    bits = RNG.integers(0, 2**32, size=(64, 5), dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values[~np.isfinite(values)] = 1.0
    exact = convert.matrix_from_proto(reparse(convert.matrix_to_proto(values)))
    assert exact is not None
    np.testing.assert_array_equal(exact.view(np.uint32), values.view(np.uint32))
    assert convert.matrix_to_proto(exact) == convert.matrix_to_proto(values)
    as_float64 = convert.matrix_from_proto(convert.matrix_to_proto(row.astype(np.float64)))
    assert as_float64 is not None and as_float64.dtype == np.float32
    with pytest.raises(ValueError, match="2-D"):
        convert.matrix_to_proto(np.zeros(3, np.float32))
    with pytest.raises(InvalidRequestError):
        convert.matrix_from_proto(cpb.Matrix(rows=2, cols=2, data=b"\x00" * 12))


# -- Cluster ----------------------------------------------------------------------------------------------------

QUERIES = [
    ClusterQuery(collection="oct"),
    ClusterQuery(collection="oct", params=ClusterParams(k=4, n_init=10, seed=3), ground_truth_attribute="label"),
    ClusterQuery(
        collection="oct",
        params=ClusterParams(algorithm="dbscan", eps=0.75, min_samples=4, pca_dim=5, backend="sklearn", curves=True),
        keys=["a", "b", "c"],
        include_details=True,
    ),
    ClusterQuery(collection="c", params=ClusterParams(algorithm="hdbscan", min_cluster_size=7, silhouette_sample=99)),
    ClusterQuery(collection="c", params=ClusterParams(algorithm="optics", k_min=3, k_max=12, max_iter=7)),
    ClusterQuery(collection="c", params=ClusterParams(algorithm="kmedoids", k=2, backend="kmedoids")),
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.params.algorithm)
def test_cluster_request_round_trip(query: ClusterQuery) -> None:
    request = reparse(convert.cluster_query_to_proto(query))
    assert request.collection == query.collection and list(request.keys) == query.keys
    assert request.parameters.HasField("eps") == (query.params.eps is not None)
    assert convert.cluster_query_from_proto(request) == query
    assert convert.cluster_query_to_proto(convert.cluster_query_from_proto(request)) == request


def test_cluster_request_details_turn_on_curves_and_zero_means_default() -> None:
    request = convert.cluster_query_to_proto(ClusterQuery(collection="c", include_details=True))
    assert convert.cluster_query_from_proto(request).params.curves is True
    assert convert.cluster_params_from_proto(cpb.ClusterRequest()) == ClusterParams()
    unspecified = cpb.ClusterRequest(algorithm=cpb.CLUSTER_ALGORITHM_UNSPECIFIED)
    assert convert.cluster_params_from_proto(unspecified).algorithm == "kmeans" == ClusterParams().algorithm
    with pytest.raises(InvalidRequestError, match="algorithm") as caught:
        convert.cluster_params_from_proto(cpb.ClusterRequest(algorithm=42))  # type: ignore[arg-type]
    assert_names_real_values(str(caught.value), cpb.ClusterAlgorithm, "CLUSTER_ALGORITHM_DBSCAN")


def _result(params: ClusterParams, n: int, *, centers: bool, noise: bool, table: bool) -> ClusterResult:
    labels = np.asarray([i % 3 for i in range(n)], np.int64)
    noise_mask = np.zeros(n, bool)
    if noise:
        labels[::4] = -1
        noise_mask = labels == -1
    return ClusterResult(
        algorithm=params.algorithm,
        backend="sklearn",
        labels=labels,
        noise=noise_mask,
        centers=unit(3, 4) if centers else None,
        medoids=np.asarray([0, 1, 2], np.int64) if params.algorithm == "kmedoids" else None,
        seconds=0.125,
        metrics={"silhouette": math.nan, "n_clusters": 3.0, "accuracy": 0.9} if table else {"n_clusters": 3.0},
        params=params,
        k=3 if centers else None,
        eps=0.5 if noise else None,
        sweep=[SweepPoint(2, math.nan, 10.0), SweepPoint(3, 0.5, 4.0)] if centers else [],
        k_distance=np.sort(RNG.random(n).astype(np.float32)) if noise else None,
        table=Contingency(clusters=[-1, 0, 1, 2], classes=["A", "B"], counts=np.arange(8, dtype=np.int64).reshape(4, 2))
        if table
        else None,
    )


CLUSTERINGS = {
    "kmeans-centroids-table-sweep": (ClusterParams(k=3), dict(centers=True, noise=False, table=True)),
    "dbscan-noise-kdistance": (ClusterParams(algorithm="dbscan"), dict(centers=False, noise=True, table=False)),
    "kmedoids-medoids": (ClusterParams(algorithm="kmedoids", k=3), dict(centers=True, noise=False, table=False)),
    "bare": (ClusterParams(algorithm="optics"), dict(centers=False, noise=False, table=False)),
}


@pytest.mark.parametrize("name", list(CLUSTERINGS))
@pytest.mark.parametrize("details", [False, True])
def test_cluster_response_round_trip(name: str, details: bool) -> None:
    params, shape = CLUSTERINGS[name]
    n = 12
    result = _result(params, n, **shape)
    keys = [f"img-{i:02d}" for i in range(n)]
    clustering = Clustering(keys=keys, result=result)
    if details:
        clustering.truth = [f"class{i % 2}" for i in range(n)]
        clustering.paths = [f"/data/{k}.jpeg" for k in keys]
        clustering.projection = RNG.standard_normal((n, 2)).astype(np.float32)
        clustering.center_distance = np.where(result.noise, np.nan, RNG.random(n)).astype(np.float32)
    response = reparse(convert.clustering_to_proto(clustering))
    # Against the proto fields themselves.
    assert list(response.assignments) == result.labels.tolist()
    assert list(response.noise) == result.noise.tolist()
    assert response.HasField("eps") == (result.eps is not None)
    assert response.centers.rows == (0 if result.centers is None else 3)
    assert list(response.medoid_keys) == (keys[:3] if result.medoids is not None else [])
    assert response.projection.rows == (n if details else 0)
    back = convert.clustering_from_proto(response, params)
    assert back.result.labels.dtype == np.int64 and back.result.noise.dtype == bool
    if back.result.centers is not None:
        assert back.result.centers.dtype == np.float32
    assert_same(back, clustering)
    assert convert.clustering_to_proto(back) == response


# -- Probe ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        ProbeQuery(collection="oct", target_attribute="label"),
        ProbeQuery(
            collection="oct",
            target_attribute="label",
            keys=["a", "b"],
            group_attribute="patient",
            classifier="knn",
            folds=4,
            knn_k=9,
            seed=11,
        ),
    ],
)
def test_probe_request_round_trip(query: ProbeQuery) -> None:
    request = reparse(convert.probe_query_to_proto(query))
    assert convert.probe_query_from_proto(request) == query
    assert convert.probe_query_to_proto(convert.probe_query_from_proto(request)) == request


def test_probe_request_defaults() -> None:
    query = convert.probe_query_from_proto(cpb.ProbeRequest(collection="c", target_attribute="label"))
    assert (query.classifier, query.folds, query.knn_k) == ("logreg", 5, 5)
    unspecified = cpb.ProbeRequest(target_attribute="label", classifier=cpb.PROBE_CLASSIFIER_UNSPECIFIED)
    assert convert.probe_query_from_proto(unspecified).classifier == "logreg"
    with pytest.raises(InvalidRequestError, match="classifier") as caught:
        convert.probe_query_from_proto(cpb.ProbeRequest(target_attribute="label", classifier=9))  # type: ignore[arg-type]
    assert_names_real_values(str(caught.value), cpb.ProbeClassifier, "PROBE_CLASSIFIER_KNN")


def test_probe_response_round_trip() -> None:
    classes = ["CNV", "DME", "NORMAL"]
    result = ProbeResult(
        classifier="logreg",
        folds=4,
        grouped_by="patient",
        accuracy=0.875,
        fold_accuracy=[0.75, 1.0, 0.875, 0.875],
        chance=0.375,
        classes=classes,
        per_class=[ClassReport(c, 0.5 + i / 8, 0.25 + i / 8, 0.125 * i, 10 + i) for i, c in enumerate(classes)],
        confusion=np.arange(9, dtype=np.int64).reshape(3, 3),
        predictions=[],
    )
    response = reparse(convert.probe_result_to_proto(result))
    assert list(response.confusion) == list(range(9))
    back = convert.probe_result_from_proto(response, grouped_by="patient")
    assert back.confusion.dtype == np.int64
    assert_same(back, result)
    assert convert.probe_result_to_proto(back) == response


# -- Filter -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        FilterQuery(collection="oct", example_keys=["a", "b"]),
        FilterQuery(collection="oct", example_keys=["a"], max_distance=0.5, keys=["a", "b", "c"]),
        FilterQuery(
            collection="oct",
            example_keys=["a"],
            cluster_ids=[-1, 3],
            by_cluster=True,
            cluster=ClusterParams(k=4, seed=2),
            unwanted_attribute="label",
            unwanted_values=["DRUSEN", "junk"],
        ),
    ],
)
def test_filter_request_round_trip(query: FilterQuery) -> None:
    request = reparse(convert.filter_query_to_proto(query))
    assert request.HasField("max_distance") == (query.max_distance is not None)
    assert request.HasField("cluster") == (query.cluster is not None)
    assert convert.filter_query_from_proto(request) == query
    assert convert.filter_query_to_proto(convert.filter_query_from_proto(request)) == request


@pytest.mark.parametrize(
    "result",
    [
        FilterResult(remove=["a"], keep=["b", "c"], method="distance", threshold=0.75),
        FilterResult(
            remove=["a", "b"],
            keep=["c"],
            method="cluster",
            precision=1.0,
            recall=0.5,
            quality=0.65,
            removed_clusters=[-1, 2],
        ),
        FilterResult(remove=[], keep=[], method="distance"),
    ],
)
def test_filter_response_round_trip(result: FilterResult) -> None:
    response = reparse(convert.filter_result_to_proto(result))
    assert response.HasField("threshold") == (result.threshold is not None)
    assert response.HasField("quality") == (result.quality is not None)
    assert convert.filter_result_from_proto(response) == result
    assert convert.filter_result_to_proto(convert.filter_result_from_proto(response)) == response
