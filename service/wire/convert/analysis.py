"""Conversions of `embedserve.v1.ClustererService` messages: Cluster, Probe, Filter and Outliers. See
`service.wire.convert` for the naming rules."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from service.errors import (
    InvalidRequestError,
)
from service.types import (
    ClassReport,
    Clustering,
    ClusterParams,
    ClusterQuery,
    ClusterResult,
    Contingency,
    FilterMethod,
    FilterQuery,
    FilterResult,
    OutlierQuery,
    OutlierResult,
    ProbeQuery,
    ProbeResult,
    SweepPoint,
)
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb

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
        min_samples=params.min_samples or 0,
        min_cluster_size=params.min_cluster_size or 0,
        max_iter=params.max_iter,
        n_init=params.n_init or 0,
        seed=params.seed,
        silhouette_sample=params.silhouette_sample,
        metric=params.metric or "",
    )
    if params.eps is not None:
        p.eps = params.eps
    return p


def cluster_params_from_proto(request: cpb.ClusterRequest) -> ClusterParams:
    """The ClusterParams a request asks for (ConfigError for a bad value; zero fields take the defaults)."""
    if request.algorithm not in ALGORITHM_NAMES:
        names = ", ".join(cpb.ClusterAlgorithm.Name(value) for value in ALGORITHM_NAMES)
        raise InvalidRequestError(f"unknown algorithm {request.algorithm}; use one of {names} (UNSPECIFIED is kmeans)")
    p = request.parameters
    values: dict[str, Any] = {
        "algorithm": ALGORITHM_NAMES[request.algorithm],
        "backend": request.backend or "auto",
        "k": p.k or None,
        "eps": p.eps if p.HasField("eps") else None,
        "pca_dim": 0 if request.skip_pca else (request.pca_dim or None),
        "seed": p.seed,
        "curves": request.include_details,
        "metric": p.metric or None,
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
        skip_pca=params.pca_dim == 0,
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
    resp.warnings.extend(result.warnings)
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
        warnings=list(resp.warnings),
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
    """The probe a request asks for (folds and knn_k 0 mean 5; UNSPECIFIED is logistic regression);
    InvalidRequestError for an unknown classifier."""
    if request.classifier not in cpb.ProbeClassifier.values():
        names = ", ".join(cpb.ProbeClassifier.keys())
        raise InvalidRequestError(
            f"unknown classifier {request.classifier}; use one of {names} (UNSPECIFIED is logreg)"
        )
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
        method="" if query.method == "auto" else query.method,
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
        method=_filter_method(request.method),
    )


def filter_result_to_proto(r: FilterResult) -> cpb.FilterResponse:
    resp = cpb.FilterResponse(
        remove=r.remove, keep=r.keep, method=r.method, removed_clusters=r.removed_clusters, reason=r.reason
    )
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
        reason=r.reason,
    )


# -- Outliers (issue 15) ------------------------------------------------------------------------------------------


def _filter_method(name: str) -> FilterMethod:
    """The filter method a request names ("" is auto); INVALID_ARGUMENT for another name."""
    if name in ("", "auto"):
        return "auto"
    if name in ("distance", "cluster"):
        return cast(FilterMethod, name)
    raise InvalidRequestError(f"unknown filter method {name!r}; use auto, distance or cluster")


def outlier_query_to_proto(query: OutlierQuery) -> cpb.OutliersRequest:
    return cpb.OutliersRequest(collection=query.collection, keys=list(query.keys), k=query.k or 0, top=query.top)


def outlier_query_from_proto(request: cpb.OutliersRequest) -> OutlierQuery:
    """The query a request asks for (k 0 is automatic, top 0 is all)."""
    return OutlierQuery(collection=request.collection, keys=list(request.keys), k=request.k or None, top=request.top)


def outlier_result_to_proto(r: OutlierResult) -> cpb.OutliersResponse:
    return cpb.OutliersResponse(
        keys=r.keys,
        kth_distance=np.asarray(r.kth_distance, np.float64).tolist(),
        lof=np.asarray(r.lof, np.float64).tolist(),
        score=np.asarray(r.score, np.float64).tolist(),
        paths=r.paths or [],
        k=r.k,
        n=r.n,
    )


def outlier_result_from_proto(r: cpb.OutliersResponse) -> OutlierResult:
    return OutlierResult(
        keys=list(r.keys),
        kth_distance=np.asarray(r.kth_distance, np.float64),
        lof=np.asarray(r.lof, np.float64),
        score=np.asarray(r.score, np.float64),
        k=r.k,
        n=r.n,
        paths=list(r.paths) or None,
    )
