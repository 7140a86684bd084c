"""The asyncio client of `embedserve.v1.EmbedderService`: the methods of `EmbedClient`, awaited.

async with AsyncEmbedClient("127.0.0.1:50051") as client:
    results = await client.embed([("scan-1", jpeg_bytes)])
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import calls
from service.client.calls import ImageInput
from service.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelArgs,
    call_unary_async,
    connect,
    remote_error,
)
from service.types import CollectionInfo, EmbedResult, ModelInfo, NeighborQuery, QueryNeighbors, VectorDType
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

R = TypeVar("R")


class AsyncEmbedClient:
    """asyncio client; the same methods as `EmbedClient`, awaited."""

    def __init__(self, target: str, **options: Unpack[ChannelArgs]) -> None:
        self.channel, self.metadata, self.timeout = connect(
            target, options, timeout=300.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, aio=True
        )
        self.stub = pb_grpc.EmbedderServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def _run(self, call: calls.Call[R], timeout: float | None) -> R:
        method = getattr(self.stub, call.method)
        response = await call_unary_async(method, call.request, timeout=timeout or self.timeout, metadata=self.metadata)
        return call.parse(response)

    async def embed(
        self,
        images: Sequence[ImageInput],
        *,
        dtype: VectorDType = "float32",
        return_vectors: bool = True,
        store: bool = False,
        collection: str = "",
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        """See `EmbedClient.embed`."""
        call = calls.embed(images, dtype=dtype, return_vectors=return_vectors, store=store, collection=collection)
        return await self._run(call, timeout)

    async def neighbors(
        self,
        queries: Sequence[NeighborQuery],
        *,
        k: int = 10,
        collection: str = "",
        filter: str = "",
        exclude_self: bool = False,
        timeout: float | None = None,
    ) -> list[QueryNeighbors]:
        """See `EmbedClient.neighbors`."""
        call = calls.neighbors(queries, k=k, collection=collection, filter=filter, exclude_self=exclude_self)
        return await self._run(call, timeout)

    async def delete_items(self, keys: Sequence[str], *, collection: str = "", timeout: float | None = None) -> int:
        """See `EmbedClient.delete_items`."""
        return await self._run(calls.delete_items(keys, collection=collection), timeout)

    async def collection_info(self, collection: str = "", *, timeout: float | None = None) -> CollectionInfo:
        """See `EmbedClient.collection_info`."""
        return await self._run(calls.collection_info(collection), timeout)

    async def list_collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        """See `EmbedClient.list_collections`."""
        return await self._run(calls.list_collections(), timeout)

    async def create_collection(
        self, name: str, *, dim: int = 0, metric: str = "", index_type: str = "", timeout: float | None = None
    ) -> CollectionInfo:
        """See `EmbedClient.create_collection`."""
        return await self._run(calls.create_collection(name, dim=dim, metric=metric, index_type=index_type), timeout)

    async def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        """See `EmbedClient.drop_collection`."""
        await self._run(calls.drop_collection(name), timeout)

    async def embed_stream(
        self,
        batches: AsyncIterable[Sequence[ImageInput]] | Iterable[Sequence[ImageInput]],
        *,
        dtype: VectorDType = "float32",
        timeout: float | None = None,
    ) -> AsyncIterator[list[EmbedResult]]:
        """See `EmbedClient.embed_stream`; `batches` may also be an async iterable."""

        async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield calls.embed_stream_request(batch, dtype=dtype)
            else:
                for batch in batches:
                    yield calls.embed_stream_request(batch, dtype=dtype)

        call = self.stub.EmbedStream(requests(), timeout=timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield calls.parse_embed(response)
        except grpc.RpcError as e:
            raise remote_error(e) from e
        finally:
            call.cancel()

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """See `EmbedClient.model_info`."""
        return await self._run(calls.model_info(), timeout)

    async def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """See `EmbedClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await call_unary_async(self.health_stub.Check, request, timeout=timeout, metadata=self.metadata)
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
