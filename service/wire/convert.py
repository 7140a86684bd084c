"""Every conversion between the wire messages of `protos/` and the records of `service.types`, in one place.

Servicers and clients call these, never build or read messages field by field themselves:

    request = convert.embed_batch_to_proto(batch)                    # client
    batch = convert.embed_batch_from_proto(request)                  # server
    response = convert.embed_response_to_proto(batch, outcomes, dim) # server
    results = convert.embed_results_from_proto(response)             # client

Naming: `<record>_to_proto(record) -> message` and `<record>_from_proto(message) -> record`. A message that breaks
the wire format (an unknown enum value, a vector of the wrong byte length, a query with no kind) raises
`InvalidRequestError`, which the API maps to INVALID_ARGUMENT. Imports only protobuf stubs, numpy and
`service.types` / `service.errors`: no grpc, no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np

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
    EmbedResult,
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
    VectorDType,
)
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb

# google.rpc.Code values (the numbers of grpc.StatusCode), for per-image and per-query statuses.
INVALID_ARGUMENT = 3
NOT_FOUND = 5

DEFAULT_K = 10
"""Neighbours per query when a request says 0."""

DTYPES: dict[int, str] = {
    pb.VECTOR_DTYPE_UNSPECIFIED: "<f4",
    pb.VECTOR_DTYPE_FLOAT32: "<f4",
    pb.VECTOR_DTYPE_FLOAT16: "<f2",
}
"""The numpy dtype of each `VectorDType` on the wire."""
_DTYPE_ENUMS: dict[str, int] = {"float32": pb.VECTOR_DTYPE_FLOAT32, "float16": pb.VECTOR_DTYPE_FLOAT16}
_DTYPE_NAMES: dict[str, VectorDType] = {"<f4": "float32", "<f2": "float16"}

ALGORITHM_NAMES: dict[int, str] = {
    cpb.CLUSTER_ALGORITHM_UNSPECIFIED: "kmeans",
    cpb.CLUSTER_ALGORITHM_KMEANS: "kmeans",
    cpb.CLUSTER_ALGORITHM_DBSCAN: "dbscan",
    cpb.CLUSTER_ALGORITHM_HDBSCAN: "hdbscan",
    cpb.CLUSTER_ALGORITHM_OPTICS: "optics",
    cpb.CLUSTER_ALGORITHM_KMEDOIDS: "kmedoids",
}
ALGORITHM_ENUMS: dict[str, int] = {name: num for num, name in ALGORITHM_NAMES.items() if num}
_CLASSIFIERS: dict[str, int] = {"logreg": cpb.PROBE_CLASSIFIER_LOGREG, "knn": cpb.PROBE_CLASSIFIER_KNN}

IMAGE_ERRORS: dict[str, type[ImageError]] = {
    cls.reason: cls for cls in (InvalidImageError, UnsupportedImageError, ImageTooLargeError, UnreadableImageError)
}
"""The `ImageError` subclass of each reason tag."""


# -- per-image statuses -----------------------------------------------------------------------------------------


def image_status(error: ImageError) -> tuple[int, str, str]:
    """(google.rpc code, reason tag, message) of one failed image, for `Result.error`."""
    return INVALID_ARGUMENT, error.reason, error.message


def image_error_from_status(code: int, reason: str, message: str) -> ImageError:
    """Rebuild the `ImageError` subclass a server reported for one image (client side)."""
    cls = IMAGE_ERRORS.get(reason)
    if cls is not None:
        return cls(message)
    error = ImageError(message or f"image failed with code {code}")
    error.reason = reason or "invalid_image"
    return error


def _set_status(target: pb.ImageStatus, code: int, reason: str, message: str) -> None:
    target.code, target.reason, target.message = code, reason, message


# -- Embed ------------------------------------------------------------------------------------------------------


def vector_dtype(enum: int) -> VectorDType:
    """The name of a wire `VectorDType` (UNSPECIFIED is float32); InvalidRequestError for an unknown value."""
    wire = DTYPES.get(enum)
    if wire is None:
        raise InvalidRequestError(f"unknown vector_dtype {enum}; use FLOAT32 or FLOAT16")
    return _DTYPE_NAMES[wire]


def image_to_proto(image: ImageData) -> pb.Image:
    return pb.Image(key=image.key, data=image.data, attributes=image.attributes)


def embed_batch_to_proto(batch: EmbedBatch) -> pb.EmbedRequest:
    """The `EmbedRequest` of a batch."""
    return pb.EmbedRequest(
        images=[image_to_proto(image) for image in batch.images],
        return_vectors=batch.return_vectors,
        vector_dtype=cast(Any, _DTYPE_ENUMS[batch.dtype]),
        store=batch.store,
        collection=batch.collection,
    )


def embed_batch_from_proto(request: pb.EmbedRequest) -> EmbedBatch:
    """The batch an `EmbedRequest` asks for (`return_vectors` unset means true)."""
    return EmbedBatch(
        images=[ImageData(image.key, image.data, dict(image.attributes)) for image in request.images],
        dtype=vector_dtype(request.vector_dtype),
        return_vectors=request.return_vectors if request.HasField("return_vectors") else True,
        store=request.store,
        collection=request.collection,
    )


def embed_response_to_proto(batch: EmbedBatch, outcomes: Sequence[EmbedOutcome], dim: int) -> pb.EmbedResponse:
    """One `Result` per image of `batch`, in order: its vector in the batch's dtype (when asked for) or its error."""
    wire = "<f2" if batch.dtype == "float16" else "<f4"
    dtype = cast(Any, _DTYPE_ENUMS[batch.dtype])
    response = pb.EmbedResponse()
    for image, outcome in zip(batch.images, outcomes, strict=True):
        result = response.results.add(key=image.key, dim=dim, dtype=dtype)
        if outcome.error is not None:
            _set_status(result.error, *image_status(outcome.error))
        elif batch.return_vectors and outcome.vector is not None:
            result.vector = np.asarray(outcome.vector).astype(wire).tobytes()
    return response


def embed_results_from_proto(response: pb.EmbedResponse) -> list[EmbedResult]:
    """`EmbedResult`s of a response, vectors decoded to float32; InvalidRequestError for a vector whose length does
    not match its `dim`."""
    results: list[EmbedResult] = []
    for r in response.results:
        if r.HasField("error"):
            error = image_error_from_status(r.error.code, r.error.reason, r.error.message)
            results.append(EmbedResult(r.key, None, error))
            continue
        vector = None
        if r.vector:
            wire = DTYPES.get(r.dtype, "<f4")
            if len(r.vector) != r.dim * np.dtype(wire).itemsize:
                raise InvalidRequestError(f"vector of {r.key!r} has {len(r.vector)} bytes, not {r.dim} {wire} values")
            vector = np.frombuffer(r.vector, dtype=wire).astype(np.float32)
        results.append(EmbedResult(r.key, vector, None))
    return results


# -- model and collections --------------------------------------------------------------------------------------


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        backbone=info.backbone,
        embedding_dim=info.embedding_dim,
        input_size=info.input_size,
        precision=info.precision,
        device=info.device,
        decode_backend=info.decode_backend,
        resize=info.resize,
        pad=info.pad,
        version=info.version,
    )


def model_info_from_proto(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        backbone=info.backbone,
        embedding_dim=info.embedding_dim,
        input_size=info.input_size,
        precision=info.precision,
        device=info.device,
        decode_backend=info.decode_backend,
        resize=info.resize,
        pad=info.pad,
        version=info.version,
    )


def collection_info_to_proto(info: CollectionInfo) -> pb.CollectionInfo:
    return pb.CollectionInfo(
        name=info.name,
        dim=info.dim,
        metric=info.metric,
        index_type=info.index_type,
        count=info.count,
        trained=info.trained,
        bytes_on_disk=info.bytes_on_disk,
        search_backend=info.search_backend,
    )


def collection_info_from_proto(info: pb.CollectionInfo) -> CollectionInfo:
    return CollectionInfo(
        name=info.name,
        dim=info.dim,
        metric=info.metric,
        index_type=info.index_type,
        count=info.count,
        trained=info.trained,
        bytes_on_disk=info.bytes_on_disk,
        search_backend=info.search_backend,
    )


def items_pages_to_proto(items: FetchedItems, *, page_size: int, include_vectors: bool) -> Iterator[pb.ItemsPage]:
    """`ListItems` pages of at most `page_size` items (at least one page, empty for no items)."""
    if page_size <= 0:
        raise InvalidRequestError(f"page_size={page_size} must be positive")
    n = len(items.keys)
    dim = int(items.vectors.shape[1]) if items.vectors.ndim == 2 else 0
    for start in range(0, max(n, 1), page_size):
        page = pb.ItemsPage(dim=dim)
        for row in range(start, min(start + page_size, n)):
            vector = np.asarray(items.vectors[row]).astype("<f4").tobytes() if include_vectors else b""
            page.items.add(key=items.keys[row], vector=vector, attributes=items.attributes[row])
        yield page


def items_from_proto(page: pb.ItemsPage) -> FetchedItems:
    """One page of `ListItems` as `FetchedItems` (vectors (n, dim) float32; (n, 0) when not sent)."""
    n = len(page.items)
    with_vectors = n > 0 and all(len(item.vector) == 4 * page.dim for item in page.items)
    if with_vectors:
        vectors = np.frombuffer(b"".join(item.vector for item in page.items), dtype="<f4").astype(np.float32)
        vectors = vectors.reshape(n, page.dim)
    else:
        vectors = np.zeros((n, 0), dtype=np.float32)
    return FetchedItems(
        keys=[item.key for item in page.items],
        vectors=vectors,
        attributes=[dict(item.attributes) for item in page.items],
    )


# -- Neighbors --------------------------------------------------------------------------------------------------


def neighbor_query_to_proto(query: NeighborQuery) -> pb.Query:
    if query.key is not None:
        return pb.Query(key=query.key)
    if query.vector is not None:
        return pb.Query(vector=np.asarray(query.vector, dtype="<f4").tobytes())
    return pb.Query(image=query.image)


def neighbor_query_from_proto(query: pb.Query, position: int = 0) -> NeighborQuery:
    """The query of one `Query` (InvalidRequestError when it has no kind or a vector of a partial float)."""
    kind = query.WhichOneof("kind")
    if kind == "key":
        return NeighborQuery(key=query.key)
    if kind == "image":
        return NeighborQuery(image=query.image)
    if kind == "vector":
        if len(query.vector) % 4:
            raise InvalidRequestError(
                f"query {position}: a vector of {len(query.vector)} bytes is not little-endian float32 values"
            )
        return NeighborQuery(vector=np.frombuffer(query.vector, dtype="<f4").astype(np.float32))
    raise InvalidRequestError(f"query {position} has no key, vector or image")


def neighbors_search_to_proto(search: NeighborsSearch) -> pb.NeighborsRequest:
    return pb.NeighborsRequest(
        collection=search.collection,
        k=search.k,
        filter=search.filter,
        queries=[neighbor_query_to_proto(q) for q in search.queries],
        exclude_self=search.exclude_self,
    )


def neighbors_search_from_proto(request: pb.NeighborsRequest) -> NeighborsSearch:
    """The search a `NeighborsRequest` asks for (k 0 means `DEFAULT_K`; the range is the use case's to check)."""
    return NeighborsSearch(
        queries=[neighbor_query_from_proto(q, i) for i, q in enumerate(request.queries)],
        k=request.k or DEFAULT_K,
        collection=request.collection,
        filter=request.filter,
        exclude_self=request.exclude_self,
    )


def neighbors_to_proto(results: Sequence[QueryNeighbors], metric: str) -> pb.NeighborsResponse:
    """One `QueryResult` per query, in order: its neighbours, best first, or its error."""
    response = pb.NeighborsResponse(metric=metric)
    for result in results:
        out = response.results.add()
        if result.error is not None:
            _set_status(out.error, result.error.code, result.error.reason, result.error.message)
            continue
        for hit in result.neighbors:
            out.neighbors.add(key=hit.key, score=hit.score, attributes=hit.attributes)
    return response


def neighbors_from_proto(response: pb.NeighborsResponse) -> list[QueryNeighbors]:
    out: list[QueryNeighbors] = []
    for result in response.results:
        if result.HasField("error"):
            e = result.error
            out.append(QueryNeighbors([], QueryError(e.code, e.reason, e.message)))
            continue
        hits = [Neighbor(key=n.key, score=float(n.score), attributes=dict(n.attributes)) for n in result.neighbors]
        out.append(QueryNeighbors(hits))
    return out


# -- Cluster ----------------------------------------------------------------------------------------------------


def matrix_to_proto(a: np.ndarray | None) -> cpb.Matrix:
    """A float32 matrix message (empty for None)."""
    if a is None:
        return cpb.Matrix()
    a = np.ascontiguousarray(a, dtype="<f4")
    if a.ndim != 2:
        raise ValueError(f"a Matrix is 2-D, got shape {a.shape}")
    return cpb.Matrix(rows=a.shape[0], cols=a.shape[1], data=a.tobytes())


def matrix_from_proto(m: cpb.Matrix) -> np.ndarray | None:
    """The float32 array of a matrix message (None when it has no rows)."""
    if not m.rows:
        return None
    if len(m.data) != 4 * m.rows * m.cols:
        raise InvalidRequestError(f"a {m.rows}x{m.cols} matrix needs {4 * m.rows * m.cols} bytes, got {len(m.data)}")
    return np.frombuffer(m.data, dtype="<f4").reshape(m.rows, m.cols).astype(np.float32)


def cluster_params_to_proto(params: ClusterParams) -> cpb.ClusterParameters:
    p = cpb.ClusterParameters(
        k=params.k or 0,
        k_min=params.k_min,
        k_max=params.k_max,
        min_samples=params.min_samples,
        min_cluster_size=params.min_cluster_size,
        max_iter=params.max_iter,
        n_init=params.n_init,
        seed=params.seed,
        silhouette_sample=params.silhouette_sample,
    )
    if params.eps is not None:
        p.eps = params.eps
    return p


def cluster_params_from_proto(request: cpb.ClusterRequest) -> ClusterParams:
    """The ClusterParams a request asks for (ConfigError for a bad value; zero fields take the defaults)."""
    if request.algorithm not in ALGORITHM_NAMES:
        raise InvalidRequestError(f"unknown algorithm {request.algorithm}; use one of {sorted(ALGORITHM_ENUMS)}")
    p = request.parameters
    values: dict[str, Any] = {
        "algorithm": ALGORITHM_NAMES[request.algorithm],
        "backend": request.backend or "auto",
        "k": p.k or None,
        "eps": p.eps if p.HasField("eps") else None,
        "pca_dim": request.pca_dim or None,
        "seed": p.seed,
        "curves": request.include_details,
    }
    for name in ("k_min", "k_max", "min_samples", "min_cluster_size", "max_iter", "n_init", "silhouette_sample"):
        value = getattr(p, name)
        if value:
            values[name] = value
    return ClusterParams(**values)


def cluster_query_to_proto(query: ClusterQuery) -> cpb.ClusterRequest:
    """The request for `query`; `params.curves` travels as `include_details` (so either one turns both on)."""
    params = query.params
    return cpb.ClusterRequest(
        collection=query.collection,
        keys=list(query.keys),
        algorithm=cast(Any, ALGORITHM_ENUMS[params.algorithm]),
        parameters=cluster_params_to_proto(params),
        pca_dim=params.pca_dim or 0,
        ground_truth_attribute=query.ground_truth_attribute,
        backend="" if params.backend == "auto" else params.backend,
        include_details=query.include_details or params.curves,
    )


def cluster_query_from_proto(request: cpb.ClusterRequest) -> ClusterQuery:
    return ClusterQuery(
        collection=request.collection,
        params=cluster_params_from_proto(request),
        keys=list(request.keys),
        ground_truth_attribute=request.ground_truth_attribute,
        include_details=request.include_details,
    )


def clustering_to_proto(clustering: Clustering) -> cpb.ClusterResponse:
    """The response for a finished clustering; the details (projection, centre distances, truth, paths) are sent
    when the clustering has them."""
    result, keys = clustering.result, clustering.keys
    resp = cpb.ClusterResponse(
        keys=list(keys),
        assignments=np.asarray(result.labels).tolist(),
        noise=np.asarray(result.noise).tolist(),
        centers=matrix_to_proto(result.centers),
        algorithm=result.algorithm,
        backend=result.backend,
        seconds=result.seconds,
        k=result.k or 0,
        metrics=result.metrics,
    )
    resp.medoid_keys.extend(clustering.medoid_keys)
    if result.eps is not None:
        resp.eps = result.eps
    if result.table is not None:
        t = result.table
        resp.table.CopyFrom(
            cpb.ContingencyTable(clusters=t.clusters, classes=t.classes, counts=np.asarray(t.counts).ravel().tolist())
        )
    resp.sweep.extend(cpb.SweepPoint(k=s.k, silhouette=s.silhouette, inertia=s.inertia) for s in result.sweep)
    if result.k_distance is not None:
        resp.k_distance.extend(np.asarray(result.k_distance).tolist())
    if clustering.projection is not None:
        resp.projection.CopyFrom(matrix_to_proto(clustering.projection))
    if clustering.center_distance is not None:
        resp.center_distance.extend(np.asarray(clustering.center_distance).tolist())
    resp.ground_truth.extend(clustering.truth or [])
    resp.paths.extend(clustering.paths or [])
    return resp


def clustering_from_proto(resp: cpb.ClusterResponse, params: ClusterParams) -> Clustering:
    """The clustering a response carries; `params` are the ones the request asked for (they are not sent back).
    The result's `features` stay empty: the clustered vectors do not travel."""
    keys = list(resp.keys)
    table = None
    if resp.HasField("table") and resp.table.classes:
        counts = np.asarray(resp.table.counts, np.int64).reshape(len(resp.table.clusters), len(resp.table.classes))
        table = Contingency(clusters=list(resp.table.clusters), classes=list(resp.table.classes), counts=counts)
    medoids = None
    if resp.medoid_keys:
        row = {key: i for i, key in enumerate(keys)}
        medoids = np.asarray([row[key] for key in resp.medoid_keys], np.int64)
    result = ClusterResult(
        algorithm=resp.algorithm,
        backend=resp.backend,
        labels=np.asarray(resp.assignments, np.int64),
        noise=np.asarray(resp.noise, bool),
        centers=matrix_from_proto(resp.centers),
        medoids=medoids,
        seconds=resp.seconds,
        metrics=dict(resp.metrics),
        params=params,
        k=resp.k or None,
        eps=resp.eps if resp.HasField("eps") else None,
        sweep=[SweepPoint(k=s.k, silhouette=s.silhouette, inertia=s.inertia) for s in resp.sweep],
        k_distance=np.asarray(resp.k_distance, np.float32) if resp.k_distance else None,
        table=table,
    )
    return Clustering(
        keys=keys,
        result=result,
        truth=list(resp.ground_truth) or None,
        paths=list(resp.paths) or None,
        projection=matrix_from_proto(resp.projection),
        center_distance=np.asarray(resp.center_distance, np.float32) if resp.center_distance else None,
    )


# -- Probe ------------------------------------------------------------------------------------------------------


def probe_query_to_proto(query: ProbeQuery) -> cpb.ProbeRequest:
    return cpb.ProbeRequest(
        collection=query.collection,
        keys=list(query.keys),
        target_attribute=query.target_attribute,
        group_attribute=query.group_attribute,
        classifier=cast(Any, _CLASSIFIERS[query.classifier]),
        folds=query.folds,
        knn_k=query.knn_k,
        seed=query.seed,
    )


def probe_query_from_proto(request: cpb.ProbeRequest) -> ProbeQuery:
    """The probe a request asks for (folds and knn_k 0 mean 5; UNSPECIFIED is logistic regression)."""
    return ProbeQuery(
        collection=request.collection,
        target_attribute=request.target_attribute,
        keys=list(request.keys),
        group_attribute=request.group_attribute,
        classifier="knn" if request.classifier == cpb.PROBE_CLASSIFIER_KNN else "logreg",
        folds=request.folds or 5,
        knn_k=request.knn_k or 5,
        seed=request.seed,
    )


def probe_result_to_proto(r: ProbeResult) -> cpb.ProbeResponse:
    return cpb.ProbeResponse(
        classifier=r.classifier,
        folds=r.folds,
        accuracy=r.accuracy,
        fold_accuracy=r.fold_accuracy,
        chance=r.chance,
        per_class=[
            cpb.ClassScores(name=c.name, precision=c.precision, recall=c.recall, f1=c.f1, support=c.support)
            for c in r.per_class
        ],
        confusion=np.asarray(r.confusion).ravel().tolist(),
    )


def probe_result_from_proto(r: cpb.ProbeResponse, *, grouped_by: str | None = None) -> ProbeResult:
    """The probe result a response carries; `grouped_by` is the request's group attribute (not sent back), and
    `predictions` stay empty (they do not travel)."""
    classes = [c.name for c in r.per_class]
    return ProbeResult(
        classifier=r.classifier,
        folds=r.folds,
        grouped_by=grouped_by,
        accuracy=r.accuracy,
        fold_accuracy=list(r.fold_accuracy),
        chance=r.chance,
        classes=classes,
        per_class=[ClassReport(c.name, c.precision, c.recall, c.f1, c.support) for c in r.per_class],
        confusion=np.asarray(r.confusion, np.int64).reshape(len(classes), len(classes)),
        predictions=[],
    )


# -- Filter -----------------------------------------------------------------------------------------------------


def filter_query_to_proto(query: FilterQuery) -> cpb.FilterRequest:
    request = cpb.FilterRequest(
        collection=query.collection,
        keys=list(query.keys),
        example_keys=list(query.example_keys),
        cluster_ids=list(query.cluster_ids),
        by_cluster=query.by_cluster,
        unwanted_attribute=query.unwanted_attribute,
        unwanted_values=list(query.unwanted_values),
    )
    if query.cluster is not None:
        request.cluster.CopyFrom(
            cluster_query_to_proto(ClusterQuery(collection=query.collection, params=query.cluster))
        )
    if query.max_distance is not None:
        request.max_distance = query.max_distance
    return request


def filter_query_from_proto(request: cpb.FilterRequest) -> FilterQuery:
    return FilterQuery(
        collection=request.collection,
        keys=list(request.keys),
        example_keys=list(request.example_keys),
        cluster_ids=list(request.cluster_ids),
        by_cluster=request.by_cluster,
        cluster=cluster_params_from_proto(request.cluster) if request.HasField("cluster") else None,
        max_distance=request.max_distance if request.HasField("max_distance") else None,
        unwanted_attribute=request.unwanted_attribute,
        unwanted_values=list(request.unwanted_values),
    )


def filter_result_to_proto(r: FilterResult) -> cpb.FilterResponse:
    resp = cpb.FilterResponse(remove=r.remove, keep=r.keep, method=r.method, removed_clusters=r.removed_clusters)
    if r.threshold is not None:
        resp.threshold = r.threshold
    if r.precision is not None:
        resp.precision = r.precision
    if r.recall is not None:
        resp.recall = r.recall
    if r.quality is not None:
        resp.quality = r.quality
    return resp


def filter_result_from_proto(r: cpb.FilterResponse) -> FilterResult:
    return FilterResult(
        remove=list(r.remove),
        keep=list(r.keep),
        method=r.method,
        threshold=r.threshold if r.HasField("threshold") else None,
        precision=r.precision if r.HasField("precision") else None,
        recall=r.recall if r.HasField("recall") else None,
        quality=r.quality if r.HasField("quality") else None,
        removed_clusters=list(r.removed_clusters),
    )
