"""The `embedserve.v1.ClustererService` servicer: Cluster, Probe, Filter and Outliers over the vectors of a stored
collection.

    add_clusterer(grpc_server, embed_server)    # registers ClustererServicer over embed_server.index

Transport only: each method converts the request (`service.wire.convert`), runs the use case of
`service.app.analysis` in a worker thread (never on the event loop) and converts the result. A run stops between
steps once the call's deadline has passed or the client has gone away (DEADLINE_EXCEEDED / CANCELLED). Errors
become status codes in `service.api.errors`, as for the Embedder.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from service.api.errors import CallGate, unary_rpc
from service.app.analysis import Analysis, ResultObserver, StopCheck, VectorSource
from service.errors import NoIndexError
from service.types import ClusterParams, ClusterQuery, FetchedItems
from service.wire import convert
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import cluster_pb2_grpc as cpb_grpc

SERVICE_NAME: str = cpb.DESCRIPTOR.services_by_name["ClustererService"].full_name
"""`embedserve.v1.ClustererService` (for reflection and health)."""

T = TypeVar("T")


def request_from_params(
    collection: str,
    params: ClusterParams,
    *,
    keys: Sequence[str] = (),
    ground_truth_attribute: str = "",
    include_details: bool = False,
) -> cpb.ClusterRequest:
    """The request that asks a server for `params` (a shorthand of `convert.cluster_query_to_proto`)."""
    query = ClusterQuery(
        collection=collection,
        params=params,
        keys=list(keys),
        ground_truth_attribute=ground_truth_attribute,
        include_details=include_details,
    )
    return convert.cluster_query_to_proto(query)


class ClustererServicer(cpb_grpc.ClustererServiceServicer):
    """Serves `embedserve.v1.ClustererService` from a vector store; at most `max_concurrent` runs at once (others
    wait)."""

    def __init__(
        self,
        store: VectorSource | None,
        *,
        max_concurrent: int = 1,
        observe: ResultObserver | None = None,
        gate: CallGate | None = None,
    ) -> None:
        self.analysis = Analysis(store, observe=observe)
        self.gate = gate if gate is not None else CallGate()
        self._slots = asyncio.Semaphore(max_concurrent)

    @unary_rpc
    async def Cluster(self, request: cpb.ClusterRequest, context: grpc.aio.ServicerContext) -> cpb.ClusterResponse:
        query = convert.cluster_query_from_proto(request)
        clustering = await self._run(context, lambda stop: self.analysis.cluster(query, should_stop=stop))
        return convert.clustering_to_proto(clustering)

    @unary_rpc
    async def Probe(self, request: cpb.ProbeRequest, context: grpc.aio.ServicerContext) -> cpb.ProbeResponse:
        query = convert.probe_query_from_proto(request)
        result = await self._run(context, lambda stop: self.analysis.probe(query))
        return convert.probe_result_to_proto(result)

    @unary_rpc
    async def Filter(self, request: cpb.FilterRequest, context: grpc.aio.ServicerContext) -> cpb.FilterResponse:
        query = convert.filter_query_from_proto(request)
        result = await self._run(context, lambda stop: self.analysis.filter(query, should_stop=stop))
        return convert.filter_result_to_proto(result)

    @unary_rpc
    async def Outliers(self, request: cpb.OutliersRequest, context: grpc.aio.ServicerContext) -> cpb.OutliersResponse:
        query = convert.outlier_query_from_proto(request)
        result = await self._run(context, lambda stop: self.analysis.outliers(query))
        return convert.outlier_result_to_proto(result)

    async def _run(self, context: grpc.aio.ServicerContext, work: Callable[[StopCheck], T]) -> T:
        """`work(should_stop)` in a worker thread, once a slot is free; `should_stop` turns true at the call's
        deadline or when the call is cancelled."""
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

    Also feeds `embed_server.metrics.observe_cluster(algorithm, backend, seconds)` when that method exists, and
    counts its calls on `embed_server.gate` when there is one (so that a graceful stop drains them too).
    """
    observe = getattr(getattr(embed_server, "metrics", None), "observe_cluster", None)
    gate = getattr(embed_server, "gate", None)
    servicer = ClustererServicer(_ServerIndex(embed_server), max_concurrent=max_concurrent, observe=observe, gate=gate)
    cpb_grpc.add_ClustererServiceServicer_to_server(servicer, grpc_server)
    return servicer
