"""Issue 11's smaller defects over real servers: cluster parameters out of range, request ids on every INTERNAL,
the bearer scheme in any case, and a metrics endpoint that stays on 127.0.0.1 by default."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from service.analysis.cluster import ClusterParams
from service.api.clusterer import add_clusterer
from service.api.interceptors import AuthInterceptor, ObserveInterceptor
from service.client import ClusterClient, RemoteError
from service.config import load_config
from service.metrics import Metrics
from service.types import FetchedItems
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

CLUSTER_SERVICE = "embedserve.v1.ClustererService"


@dataclass
class Store:
    """34 items in collection `small`; fetching `broken` fails the way a bug would."""

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems:
        if collection == "broken":
            raise RuntimeError("an internal detail that must stay in the log")
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(34, 8)).astype(np.float32)
        return FetchedItems(keys=[f"k{i}" for i in range(34)], vectors=vectors, attributes=[{} for _ in range(34)])


@dataclass
class EmbedServerStub:
    index: Store
    metrics: Any


@pytest.fixture(scope="module", params=["observed", "bare"])
def cluster_target(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Clusterer over `Store`, with the server's ObserveInterceptor (`observed`) or with no interceptor."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    holder: dict[str, Any] = {}

    async def start() -> None:
        metrics = Metrics()
        interceptors = [ObserveInterceptor(metrics, {CLUSTER_SERVICE})] if request.param == "observed" else []
        server = grpc.aio.server(interceptors=interceptors)
        add_clusterer(server, EmbedServerStub(Store(), metrics))
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield f"127.0.0.1:{holder['port']}"
    asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (ClusterParams(algorithm="optics", min_samples=1000), "min_samples=1000"),
        (ClusterParams(algorithm="hdbscan", min_cluster_size=500), "min_cluster_size=500"),
        (ClusterParams(algorithm="dbscan", min_samples=35), "min_samples=35"),
        (ClusterParams(algorithm="kmeans", k=40), "k=40"),
    ],
)
def test_out_of_range_cluster_parameters_are_invalid_argument(cluster_target: str, params, named: str) -> None:  # type: ignore[no-untyped-def]
    with ClusterClient(cluster_target, retries=False) as client, pytest.raises(RemoteError) as refused:
        client.cluster("small", params)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert named in refused.value.details and "34" in refused.value.details


def test_every_internal_error_names_its_request_id_in_the_reply_and_the_log(
    cluster_target: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="service.api.errors"),
        ClusterClient(cluster_target, retries=False) as client,
        pytest.raises(RemoteError) as failed,
    ):
        client.cluster("broken", ClusterParams(k=2))
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert "internal detail" not in failed.value.details
    match = re.search(r"request id ([0-9a-zA-Z-]+)", failed.value.details)
    assert match, failed.value.details
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, under the same id


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("BEARER s3cret", True),
        ("  bEaReR   s3cret ", True),
        ("Bearer wrong", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        ("Bearers3cret", False),
        ("", False),
    ],
)
def test_the_bearer_scheme_is_case_insensitive(header: str, accepted: bool) -> None:
    assert AuthInterceptor("s3cret").accepts(header) is accepted


def test_a_real_server_takes_a_lowercase_bearer_and_binds_metrics_to_loopback(start_server) -> None:  # type: ignore[no-untyped-def]
    assert load_config(env={}).server.metrics_host == "127.0.0.1"
    server = start_server(server__auth_token="s3cret", server__metrics_port=0)
    endpoint = server.server.metrics_endpoint
    assert endpoint is not None and endpoint.host == "127.0.0.1"
    assert endpoint._httpd.server_address[0] == "127.0.0.1"  # the socket itself, not just the config
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderServiceStub(channel)
        for scheme in ("bearer", "BEARER", "Bearer"):
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", f"{scheme} s3cret"),))
            assert info.model_info.embedding_dim > 0
        with pytest.raises(grpc.RpcError) as denied:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", "bearer nope"),))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
