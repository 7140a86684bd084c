"""The blocking client of `embedserve.v1.EmbedderService`.

    with EmbedClient("127.0.0.1:50051") as client:
        results = client.embed([("scan-1", jpeg_bytes)])
        results[0].vector            # np.ndarray float32, unit norm (or None and results[0].error)

        client.embed([("scan-1", jpeg_bytes, {"label": "DME"})], store=True, collection="oct")   # durable on return
        hits = client.neighbors([NeighborQuery(key="scan-1")], k=10, collection="oct", filter="label == DME")
        hits[0].neighbors[0].key, hits[0].neighbors[0].score

Failed calls raise `RemoteError` (with the gRPC status code); failed images come back as `ImageError`s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import calls
from service.client.calls import ImageInput
from service.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelArgs,
    RemoteError,
    WaitNotice,
    call_unary,
    connect,
    remote_error,
    wait_for_serving,
)
from service.types import (
    CollectionInfo,
    EmbedResult,
    FetchedItems,
    ModelInfo,
    NeighborQuery,
    QueryNeighbors,
    VectorDType,
)
from service.wire import convert
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

__all__ = ["EmbedClient", "RemoteError"]

R = TypeVar("R")


class EmbedClient:
    """Blocking client. `tls=True` (with optional `root_certificates` PEM) for a TLS server; `token` for auth.

    Calls refused as busy (RESOURCE_EXHAUSTED) or unavailable (draining, restarting) are retried per
    `service.client.channel.RETRY_POLICY`, with jittered backoff; `retries=False` hands every refusal to the caller.
    """

    def __init__(self, target: str, **options: Unpack[ChannelArgs]) -> None:
        self.channel, self.metadata, self.timeout = connect(
            target, options, timeout=300.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES
        )
        self.stub = pb_grpc.EmbedderServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _run(self, call: calls.Call[R], timeout: float | None) -> R:
        method = getattr(self.stub, call.method)
        response = call_unary(method, call.request, timeout=timeout or self.timeout, metadata=self.metadata)
        return call.parse(response)

    def _stream(self, call: Any, parse: Any) -> Iterator[Any]:
        try:
            for response in call:
                yield parse(response)
        except grpc.RpcError as e:
            raise remote_error(e) from e
        finally:
            call.cancel()

    def embed(
        self,
        images: Sequence[ImageInput],
        *,
        dtype: VectorDType = "float32",
        return_vectors: bool = True,
        store: bool = False,
        collection: str = "",
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        """Embed (key, bytes[, attributes]) tuples in one call; one result per image, in order.

        With `store`, the vectors are also upserted into `collection` (with the attributes), durably before this
        returns.
        """
        call = calls.embed(images, dtype=dtype, return_vectors=return_vectors, store=store, collection=collection)
        return self._run(call, timeout)

    def neighbors(
        self,
        queries: Sequence[NeighborQuery],
        *,
        k: int = 10,
        collection: str = "",
        filter: str = "",
        exclude_self: bool = False,
        timeout: float | None = None,
    ) -> list[QueryNeighbors]:
        """The k nearest stored items to each query, best first; one result per query, in order."""
        call = calls.neighbors(queries, k=k, collection=collection, filter=filter, exclude_self=exclude_self)
        return self._run(call, timeout)

    def delete_items(self, keys: Sequence[str], *, collection: str = "", timeout: float | None = None) -> int:
        """Delete items by key (durable on return); how many existed."""
        return self._run(calls.delete_items(keys, collection=collection), timeout)

    def iter_items(
        self,
        *,
        collection: str = "",
        keys: Sequence[str] | None = None,
        include_vectors: bool = True,
        page_size: int = 1024,
        timeout: float | None = None,
    ) -> Iterator[FetchedItems]:
        """Stored items page by page: every item sorted by key, or the given keys in order."""
        request = calls.list_items_request(
            collection=collection, keys=keys, include_vectors=include_vectors, page_size=page_size
        )
        call = self.stub.ListItems(request, timeout=timeout, metadata=self.metadata)
        yield from self._stream(call, convert.items_from_proto)

    def fetch_items(
        self, *, collection: str = "", keys: Sequence[str] | None = None, include_vectors: bool = True
    ) -> FetchedItems:
        """All of `iter_items` in one `FetchedItems`."""
        return calls.merge_pages(
            list(self.iter_items(collection=collection, keys=keys, include_vectors=include_vectors))
        )

    def collection_info(self, collection: str = "", *, timeout: float | None = None) -> CollectionInfo:
        """Count, dimension, metric, index type and state of a collection ("" = the default one)."""
        return self._run(calls.collection_info(collection), timeout)

    def list_collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        """Every collection of the server."""
        return self._run(calls.list_collections(), timeout)

    def create_collection(
        self, name: str, *, dim: int = 0, metric: str = "", index_type: str = "", timeout: float | None = None
    ) -> CollectionInfo:
        """Create an empty collection (dim 0 = the model's; metric and index type "" = the server's defaults)."""
        return self._run(calls.create_collection(name, dim=dim, metric=metric, index_type=index_type), timeout)

    def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Delete a collection and everything in it."""
        self._run(calls.drop_collection(name), timeout)

    def embed_stream(
        self, batches: Iterable[Sequence[ImageInput]], *, dtype: VectorDType = "float32", timeout: float | None = None
    ) -> Iterator[list[EmbedResult]]:
        """Stream batches through `EmbedStream`; yields the results of each batch, in order.

        `timeout` (default none) bounds the whole stream. gRPC flow control limits how far it reads ahead.
        """
        requests = (calls.embed_stream_request(batch, dtype=dtype) for batch in batches)
        call = self.stub.EmbedStream(requests, timeout=timeout, metadata=self.metadata)
        yield from self._stream(call, calls.parse_embed)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What model the server runs."""
        return self._run(calls.model_info(), timeout)

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """The health status name (`SERVING`, `NOT_SERVING`, ...) of `service` ("" = the whole server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = call_unary(self.health_stub.Check, request, timeout=timeout, metadata=self.metadata)
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    def wait_until_serving(self, timeout: float = 120.0, *, on_wait: WaitNotice | None = None) -> None:
        """Block until health says SERVING (the server may be starting, loading its model or restarting).

        Polls with backoff and jitter for at most `timeout` seconds; `on_wait(reason)` is called once if it has to
        wait. Raises `RemoteError` (UNAVAILABLE) when the server is not SERVING in time.
        """
        wait_for_serving(self.channel, timeout=timeout, metadata=self.metadata, on_wait=on_wait)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
