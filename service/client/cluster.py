"""Blocking client of `embedserve.v1.ClustererService`: Cluster, Probe and Filter, returning records, not messages.

with ClusterClient("host:port", token=...) as client:
    clustering = client.cluster("oct", ClusterParams(k=4), ground_truth_attribute="label")
    clustering.result.labels, clustering.result.metrics["accuracy"], clustering.keys
    probe = client.probe("oct", "label", group_attribute="patient")        # ProbeResult
    removal = client.filter("oct", example_keys=["a.jpeg", "b.jpeg"])      # FilterResult
    odd = client.outliers("oct", top=10)                                    # OutlierResult
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Unpack

from service.client.channel import (
    ChannelArgs,
    WaitNotice,
    call_unary,
    connect,
    wait_for_serving,
)
from service.types import (
    Classifier,
    Clustering,
    ClusterParams,
    ClusterQuery,
    FilterMethod,
    FilterQuery,
    FilterResult,
    OutlierQuery,
    OutlierResult,
    ProbeQuery,
    ProbeResult,
)
from service.wire import convert
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import cluster_pb2_grpc as cpb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Responses carry one entry per item (and a projection with details): allow large ones."""


class ClusterClient:
    """`ClusterClient("host:port", token=...)`; each call raises `RemoteError` with the server's status."""

    def __init__(self, target: str, **options: Unpack[ChannelArgs]) -> None:
        self.channel, self.metadata, self.timeout = connect(
            target, options, timeout=600.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES
        )
        self.stub = cpb_grpc.ClustererServiceStub(self.channel)

    def wait_until_serving(self, timeout: float = 120.0, *, on_wait: WaitNotice | None = None) -> None:
        """Block until health says SERVING; see `EmbedClient.wait_until_serving`."""
        wait_for_serving(self.channel, timeout=timeout, metadata=self.metadata, on_wait=on_wait)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return call_unary(method, request, timeout=timeout or self.timeout, metadata=self.metadata)

    def cluster(
        self,
        collection: str,
        params: ClusterParams | None = None,
        *,
        keys: Sequence[str] = (),
        ground_truth_attribute: str = "",
        include_details: bool = False,
        timeout: float | None = None,
    ) -> Clustering:
        """Cluster the vectors of `collection` (or of `keys` in it) on the server.

        With `ground_truth_attribute`, the metrics include accuracy, NMI, ARI and purity and the result has the
        cluster-by-class table; with `include_details`, the clustering has the 2-D projection, centre distances,
        truth and paths a report needs.
        """
        query = ClusterQuery(
            collection=collection,
            params=params or ClusterParams(),
            keys=list(keys),
            ground_truth_attribute=ground_truth_attribute,
            include_details=include_details,
        )
        return self.cluster_request(convert.cluster_query_to_proto(query), timeout=timeout)

    def cluster_request(self, request: cpb.ClusterRequest, *, timeout: float | None = None) -> Clustering:
        """Send a prebuilt `ClusterRequest` as it is (the server validates it) and return its clustering."""
        response = self._call(self.stub.Cluster, request, timeout)
        return convert.clustering_from_proto(response, convert.cluster_params_from_proto(request))

    def probe(
        self,
        collection: str,
        target_attribute: str,
        *,
        keys: Sequence[str] = (),
        group_attribute: str = "",
        classifier: Classifier = "logreg",
        folds: int = 5,
        knn_k: int = 5,
        seed: int = 0,
        timeout: float | None = None,
    ) -> ProbeResult:
        """Cross-validate a classifier of `target_attribute` on the stored vectors (groups kept on one side of every
        split with `group_attribute`)."""
        query = ProbeQuery(
            collection=collection,
            target_attribute=target_attribute,
            keys=list(keys),
            group_attribute=group_attribute,
            classifier=classifier,
            folds=folds,
            knn_k=knn_k,
            seed=seed,
        )
        response = self._call(self.stub.Probe, convert.probe_query_to_proto(query), timeout)
        return convert.probe_result_from_proto(response, grouped_by=group_attribute or None)

    def filter(
        self,
        collection: str,
        *,
        keys: Sequence[str] = (),
        example_keys: Sequence[str] = (),
        cluster_ids: Sequence[int] = (),
        by_cluster: bool = False,
        params: ClusterParams | None = None,
        max_distance: float | None = None,
        unwanted_attribute: str = "",
        unwanted_values: Sequence[str] = (),
        method: FilterMethod = "auto",
        timeout: float | None = None,
    ) -> FilterResult:
        """The keys to remove and keep: those near `example_keys`, or (`by_cluster` / `cluster_ids`) whole clusters
        of a clustering with `params`; scored when `unwanted_attribute` / `unwanted_values` mark the truly
        unwanted items. `method` auto chooses from the data (the reason is in the result's `reason`)."""
        query = FilterQuery(
            collection=collection,
            keys=list(keys),
            example_keys=list(example_keys),
            cluster_ids=list(cluster_ids),
            by_cluster=by_cluster,
            cluster=params,
            max_distance=max_distance,
            unwanted_attribute=unwanted_attribute,
            unwanted_values=list(unwanted_values),
            method=method,
        )
        response = self._call(self.stub.Filter, convert.filter_query_to_proto(query), timeout)
        return convert.filter_result_from_proto(response)

    def outliers(
        self,
        collection: str,
        *,
        keys: Sequence[str] = (),
        k: int | None = None,
        top: int = 0,
        timeout: float | None = None,
    ) -> OutlierResult:
        """The items of `collection` (or `keys`) ranked most unusual first: distance to the k-th neighbour and LOF
        (`k` None: automatic; `top` 0: every item)."""
        query = OutlierQuery(collection=collection, keys=list(keys), k=k, top=top)
        response = self._call(self.stub.Outliers, convert.outlier_query_to_proto(query), timeout)
        return convert.outlier_result_from_proto(response)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
