"""The `embedserve.v1.Clusterer` servicer: Cluster, Probe and Filter over the vectors of a stored collection.

    add_clusterer(grpc_server, embed_server)    # registers ClustererServicer(embed_server.index)

Transport only: requests become `ClusterParams` and calls into `service.analysis.cluster` /
`service.analysis.evaluate`, run in a
worker thread (never on the event loop), and results become responses. A run stops between steps once the call's
deadline has passed or the client has gone away (DEADLINE_EXCEEDED / CANCELLED). Errors become status codes here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

import grpc
import numpy as np

from service.analysis import evaluate
from service.analysis.cluster import (
    BackendUnavailableError,
    ClusterInterruptedError,
    ClusterParams,
    ClusterResult,
    cluster,
)
from service.api.errors import rpc_status
from service.errors import ConfigError, EmbedServeError
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import cluster_pb2_grpc as cpb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = cpb.DESCRIPTOR.services_by_name["Clusterer"].full_name
"""`embedserve.v1.Clusterer` (for reflection and health)."""

ALGORITHM_NAMES: dict[int, str] = {
    cpb.CLUSTER_ALGORITHM_UNSPECIFIED: "kmeans",
    cpb.CLUSTER_ALGORITHM_KMEANS: "kmeans",
    cpb.CLUSTER_ALGORITHM_DBSCAN: "dbscan",
    cpb.CLUSTER_ALGORITHM_HDBSCAN: "hdbscan",
    cpb.CLUSTER_ALGORITHM_OPTICS: "optics",
    cpb.CLUSTER_ALGORITHM_KMEDOIDS: "kmedoids",
}
ALGORITHM_ENUMS: dict[str, int] = {name: num for num, name in ALGORITHM_NAMES.items() if num}


class FetchedItems(Protocol):
    """What the index returns for a fetch: keys, their vectors (float32 (n, d)) and attributes, in order."""

    @property
    def keys(self) -> list[str]: ...

    @property
    def vectors(self) -> np.ndarray: ...

    @property
    def attributes(self) -> list[dict[str, str]]: ...


class VectorStore(Protocol):
    """The part of `service.index.store.IndexStore` the clusterer uses.

    `fetch` raises an EmbedServeError subclass for an unknown collection or key.
    """

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems: ...


class ClusterRequestError(EmbedServeError):
    """The request cannot be served as asked (INVALID_ARGUMENT); the message says why."""


class NoIndexError(EmbedServeError):
    """This server has no index to cluster (UNAVAILABLE)."""


ResultObserver = Callable[[str, str, float], None]
"""Called with (algorithm, backend, seconds) after each clustering, e.g. to feed a duration histogram."""


# -- request and response mapping -------------------------------------------------------------------------------


def params_from_request(request: cpb.ClusterRequest) -> ClusterParams:
    """The ClusterParams a request asks for (ConfigError for a bad value)."""
    if request.algorithm not in ALGORITHM_NAMES:
        raise ConfigError(f"unknown algorithm {request.algorithm}; use one of {sorted(ALGORITHM_ENUMS)}")
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


def request_from_params(
    collection: str,
    params: ClusterParams,
    *,
    keys: Sequence[str] = (),
    ground_truth_attribute: str = "",
    include_details: bool = False,
) -> cpb.ClusterRequest:
    """The request that asks a server for `params` (the client side of `params_from_request`)."""
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
    return cpb.ClusterRequest(
        collection=collection,
        keys=list(keys),
        algorithm=ALGORITHM_ENUMS[params.algorithm],  # type: ignore[arg-type]
        parameters=p,
        pca_dim=params.pca_dim or 0,
        ground_truth_attribute=ground_truth_attribute,
        backend="" if params.backend == "auto" else params.backend,
        include_details=include_details or params.curves,
    )


def matrix(a: np.ndarray | None) -> cpb.Matrix:
    """A float32 matrix message (empty for None)."""
    if a is None:
        return cpb.Matrix()
    a = np.ascontiguousarray(a, dtype="<f4")
    return cpb.Matrix(rows=a.shape[0], cols=a.shape[1], data=a.tobytes())


def from_matrix(m: cpb.Matrix) -> np.ndarray | None:
    """The array of a matrix message (None when empty)."""
    if not m.rows:
        return None
    return np.frombuffer(m.data, dtype="<f4").reshape(m.rows, m.cols).astype(np.float32)


def response_from_result(
    result: ClusterResult,
    keys: Sequence[str],
    *,
    include_details: bool,
    truth: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
) -> cpb.ClusterResponse:
    """The response for a finished clustering of `keys`."""
    resp = cpb.ClusterResponse(
        keys=list(keys),
        assignments=result.labels.tolist(),
        noise=result.noise.tolist(),
        centers=matrix(result.centers),
        algorithm=result.algorithm,
        backend=result.backend,
        seconds=result.seconds,
        k=result.k or 0,
        metrics=result.metrics,
    )
    if result.medoids is not None:
        resp.medoid_keys.extend(keys[i] for i in result.medoids.tolist())
    if result.eps is not None:
        resp.eps = result.eps
    if result.table is not None:
        t = result.table
        resp.table.CopyFrom(
            cpb.ContingencyTable(clusters=t.clusters, classes=t.classes, counts=t.counts.ravel().tolist())
        )
    resp.sweep.extend(cpb.SweepPoint(k=s.k, silhouette=s.silhouette, inertia=s.inertia) for s in result.sweep)
    if result.k_distance is not None:
        resp.k_distance.extend(result.k_distance.tolist())
    if include_details:
        resp.projection.CopyFrom(matrix(evaluate.projection_2d(result.features, seed=result.params.seed)))
        resp.center_distance.extend(result.center_distances().tolist())
        resp.ground_truth.extend(truth or [])
        resp.paths.extend(paths or [])
    return resp


def probe_response(r: evaluate.ProbeResult) -> cpb.ProbeResponse:
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
        confusion=r.confusion.ravel().tolist(),
    )


# -- the servicer -----------------------------------------------------------------------------------------------


class ClustererServicer(cpb_grpc.ClustererServicer):
    """Serves `embedserve.v1.Clusterer` from a vector store; at most `max_concurrent` runs at once (others wait)."""

    def __init__(
        self, store: VectorStore | None, *, max_concurrent: int = 1, observe: ResultObserver | None = None
    ) -> None:
        self.store = store
        self._slots = asyncio.Semaphore(max_concurrent)
        self._observe = observe

    async def Cluster(self, request: cpb.ClusterRequest, context: grpc.aio.ServicerContext) -> cpb.ClusterResponse:
        return await self._run(context, lambda stop: self._cluster(request, stop))

    async def Probe(self, request: cpb.ProbeRequest, context: grpc.aio.ServicerContext) -> cpb.ProbeResponse:
        return await self._run(context, lambda stop: self._probe(request))

    async def Filter(self, request: cpb.FilterRequest, context: grpc.aio.ServicerContext) -> cpb.FilterResponse:
        return await self._run(context, lambda stop: self._filter(request, stop))

    async def _run(self, context: grpc.aio.ServicerContext, work: Callable[[Callable[[], bool]], Any]) -> Any:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        cancelled = threading.Event()

        def should_stop() -> bool:
            return cancelled.is_set() or (deadline is not None and time.monotonic() > deadline)

        try:
            async with self._slots:
                return await asyncio.to_thread(work, should_stop)
        except asyncio.CancelledError:
            cancelled.set()  # the worker thread stops at its next check
            raise
        except ClusterInterruptedError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before clustering finished")
            raise AssertionError("context.abort returned") from None
        except Exception as e:
            await _abort(context, e)

    # The three calls, each run in a worker thread.

    def _fetch(self, collection: str, keys: Sequence[str]) -> FetchedItems:
        if self.store is None:
            raise NoIndexError("this server has no index: start it with a data directory to store collections")
        if not collection:
            raise ClusterRequestError("name the collection")
        return self.store.fetch(collection, list(keys) or None)

    def _cluster(self, request: cpb.ClusterRequest, should_stop: Callable[[], bool]) -> cpb.ClusterResponse:
        params = params_from_request(request)
        items = self._fetch(request.collection, request.keys)
        truth = _attribute(items, request.ground_truth_attribute) if request.ground_truth_attribute else None
        result = cluster(items.vectors, params, truth=truth, should_stop=should_stop)
        if self._observe is not None:
            self._observe(result.algorithm, result.backend, result.seconds)
        paths = [a.get("path", "") for a in items.attributes] if request.include_details else None
        return response_from_result(
            result, items.keys, include_details=request.include_details, truth=truth, paths=paths
        )

    def _probe(self, request: cpb.ProbeRequest) -> cpb.ProbeResponse:
        if not request.target_attribute:
            raise ClusterRequestError("name the target_attribute to predict (e.g. label)")
        items = self._fetch(request.collection, request.keys)
        truth = _attribute(items, request.target_attribute)
        groups = _attribute(items, request.group_attribute) if request.group_attribute else None
        classifier: evaluate.Classifier = "knn" if request.classifier == cpb.PROBE_CLASSIFIER_KNN else "logreg"
        try:
            r = evaluate.run_probe(
                items.vectors,
                truth,
                classifier=classifier,
                folds=request.folds or 5,
                groups=groups,
                group_name=request.group_attribute or None,
                knn_k=request.knn_k or 5,
                seed=request.seed,
            )
        except ValueError as e:
            raise ClusterRequestError(str(e)) from e
        return probe_response(r)

    def _filter(self, request: cpb.FilterRequest, should_stop: Callable[[], bool]) -> cpb.FilterResponse:
        items = self._fetch(request.collection, request.keys)
        unwanted = None
        if request.unwanted_attribute:
            values = set(request.unwanted_values)
            marks = _attribute(items, request.unwanted_attribute)
            unwanted = [k for k, v in zip(items.keys, marks, strict=True) if v in values]
        resp = cpb.FilterResponse()
        try:
            if request.by_cluster or request.cluster_ids:
                result = cluster(items.vectors, params_from_request(request.cluster), should_stop=should_stop)
                ids = set(request.cluster_ids)
                ids.update(evaluate.example_clusters(items.keys, result.labels, list(request.example_keys)))
                if not ids:
                    raise ClusterRequestError("no cluster to remove: give cluster_ids or examples that fall in one")
                r = evaluate.filter_by_clusters(items.keys, result.labels, sorted(ids), unwanted=unwanted)
                resp.removed_clusters.extend(sorted(ids))
            else:
                if not request.example_keys:
                    raise ClusterRequestError("give example_keys (or cluster_ids / by_cluster)")
                max_d = request.max_distance if request.HasField("max_distance") else None
                r = evaluate.filter_by_examples(
                    items.keys, items.vectors, list(request.example_keys), max_distance=max_d, unwanted=unwanted
                )
        except KeyError as e:
            raise ClusterRequestError(str(e.args[0]) if e.args else "unknown example key") from e
        except ValueError as e:
            if isinstance(e, EmbedServeError):
                raise
            raise ClusterRequestError(str(e)) from e
        resp.remove.extend(r.remove)
        resp.keep.extend(r.keep)
        resp.method = r.method
        if r.threshold is not None:
            resp.threshold = r.threshold
        if r.precision is not None and r.recall is not None and r.quality is not None:
            resp.precision, resp.recall, resp.quality = r.precision, r.recall, r.quality
        return resp


def _attribute(items: FetchedItems, name: str) -> list[str]:
    """Each item's value of attribute `name` ("" where missing); refuses an attribute no item has."""
    values = [a.get(name, "") for a in items.attributes]
    if values and not any(values):
        raise ClusterRequestError(f"no item of the collection has the attribute {name!r}")
    return values


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ClusterRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (BackendUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (NoIndexError, grpc.StatusCode.UNAVAILABLE),
)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status for `error`; internal errors are logged and sent without details."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    for cls, code in _CODES:
        if isinstance(error, cls):
            await context.abort(code, str(error))
    code, message = rpc_status(error)
    if code == grpc.StatusCode.INTERNAL and isinstance(error, EmbedServeError):
        # The index's own errors are written for the caller; unknown collections and keys are lookups.
        code = grpc.StatusCode.NOT_FOUND if isinstance(error, LookupError) else grpc.StatusCode.INVALID_ARGUMENT
        message = str(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("clusterer call failed with an internal error", exc_info=error)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # unreachable: abort raises


class _ServerIndex:
    """The index of an embed server, looked up at each call (the server may open it after registration)."""

    def __init__(self, embed_server: Any) -> None:
        self._server = embed_server

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems:
        store = getattr(self._server, "index", None)
        if store is None:
            raise NoIndexError("this server has no index: start it with a data directory to store collections")
        items: FetchedItems = store.fetch(collection, keys)
        return items


def add_clusterer(grpc_server: grpc.aio.Server, embed_server: Any, *, max_concurrent: int = 1) -> ClustererServicer:
    """Register the Clusterer on `grpc_server`, serving from `embed_server.index` (read at each call).

    Also feeds `embed_server.metrics.observe_cluster(algorithm, backend, seconds)` when that method exists.
    """
    observe = getattr(getattr(embed_server, "metrics", None), "observe_cluster", None)
    servicer = ClustererServicer(_ServerIndex(embed_server), max_concurrent=max_concurrent, observe=observe)
    cpb_grpc.add_ClustererServicer_to_server(servicer, grpc_server)
    return servicer
