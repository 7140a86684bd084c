"""Typed Python clients of the embedserve gRPC API; they return records of `service.types` and never load torch.

    from service.client import EmbedClient, NeighborQuery

    with EmbedClient("127.0.0.1:50051") as client:
        results = client.embed([("scan-1", jpeg_bytes)])
        hits = client.neighbors([NeighborQuery(key="scan-1")], k=10)

`AsyncEmbedClient` is the same for asyncio; `ClusterClient` calls Cluster, Probe and Filter; `RemoteEmbedder`
looks like the engine to the directory job and streams through `EmbedStream`. Failed calls raise `RemoteError`.
"""

from service.client.aio import AsyncEmbedClient
from service.client.calls import ImageInput
from service.client.channel import DEFAULT_MAX_MESSAGE_BYTES, RemoteError, auth_metadata, open_aio_channel, open_channel
from service.client.cluster import ClusterClient
from service.client.remote import RemoteEmbedder
from service.client.sync import EmbedClient
from service.types import (
    Clustering,
    ClusterParams,
    ClusterResult,
    EmbedResult,
    FilterResult,
    NeighborQuery,
    ProbeResult,
    QueryError,
    QueryNeighbors,
    VectorDType,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AsyncEmbedClient",
    "ClusterClient",
    "ClusterParams",
    "ClusterResult",
    "Clustering",
    "EmbedClient",
    "EmbedResult",
    "FilterResult",
    "ImageInput",
    "NeighborQuery",
    "ProbeResult",
    "QueryError",
    "QueryNeighbors",
    "RemoteEmbedder",
    "RemoteError",
    "VectorDType",
    "auth_metadata",
    "open_aio_channel",
    "open_channel",
]
