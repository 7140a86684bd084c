"""The `embedserve.v1.EmbedderService` servicer: Embed, EmbedStream, Neighbors, GetModelInfo and the index operations.

Transport only: each method converts the request (`service.wire.convert`), calls a use case (`service.app`) and
converts the result back. Drain accounting and the mapping of errors to status codes are the decorators of
`service.api.errors`. Embedding is UNAVAILABLE until `attach()` hands over the batcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from service.api.errors import CallGate, stream_rpc, unary_rpc
from service.app.embedding import Embedding, ImageEmbedder, IndexThreads
from service.app.neighbors import Neighbors
from service.config import Config
from service.errors import EngineUnavailableError
from service.index.store import DEFAULT_COLLECTION, IndexStore
from service.metrics import Metrics
from service.types import EmbedBatch, ModelInfo
from service.wire import convert
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EmbedderService"].full_name
"""`embedserve.v1.EmbedderService`."""

STREAM_WINDOW = 4
"""Requests of one EmbedStream in the batcher at once; the server reads no further until the oldest is answered."""

DRAIN_MESSAGE = "server shutting down; resume elsewhere (the requests answered so far are done)"
"""The UNAVAILABLE detail that ends an open EmbedStream when the server drains."""

PAGE_SIZE = 1024
"""Items per `ListItems` page when the request says 0."""


class EmbedderServicer(pb_grpc.EmbedderServiceServicer):
    """`embedserve.v1.EmbedderService` over the embedding and neighbours use cases and the index."""

    def __init__(self, cfg: Config, index: IndexStore, metrics: Metrics | None = None, *, gate: CallGate) -> None:
        self.index = index
        self.metrics = metrics if metrics is not None else Metrics()
        self.gate = gate
        self.threads = IndexThreads()
        max_images = min(cfg.server.max_images_per_request, cfg.batcher.max_queue_size)
        self.embedding = Embedding(index, threads=self.threads, max_images=max_images, metrics=self.metrics)
        self.neighbors = Neighbors(index, self.embedding, threads=self.threads, metrics=self.metrics)

    def attach(self, batcher: ImageEmbedder, info: ModelInfo) -> None:
        """Start embedding through `batcher`."""
        self.embedding.attach(batcher, info)

    def close(self) -> None:
        """Wait for the index calls in flight, then stop the index threads."""
        self.threads.shutdown()

    @unary_rpc
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        batch = convert.embed_batch_from_proto(request)
        self.embedding.validate(batch)
        outcomes = await self.embedding.embed(batch, timeout=context.time_remaining(), wait=False)
        return convert.embed_response_to_proto(batch, outcomes, self.embedding.model_info().embedding_dim)

    async def _embed_streamed(self, batch: EmbedBatch, context: grpc.aio.ServicerContext) -> pb.EmbedStreamResponse:
        """One request of an EmbedStream: a full queue is waited on, not refused."""
        outcomes = await self.embedding.embed(batch, timeout=context.time_remaining(), wait=True)
        return convert.embed_stream_response_to_proto(batch, outcomes, self.embedding.model_info().embedding_dim)

    @stream_rpc
    async def EmbedStream(  # gRPC method names
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        # A reader task feeds a bounded queue of per-request tasks; this generator answers them in order. When the
        # queue is full the reader stops reading, and gRPC flow control holds the client back.
        window: asyncio.Queue[asyncio.Future[pb.EmbedStreamResponse] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(request_iterator, context, window))
        try:
            while (next_response := await window.get()) is not None:
                yield await next_response
        finally:
            reader.cancel()
            while not window.empty():
                pending = window.get_nowait()
                if pending is not None:
                    pending.cancel()

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[pb.EmbedStreamRequest],
        context: grpc.aio.ServicerContext,
        window: asyncio.Queue[asyncio.Future[pb.EmbedStreamResponse] | None],
    ) -> None:
        messages = aiter(request_iterator)
        try:
            while (request := await self._next_request(messages)) is not None:
                batch = convert.embed_batch_from_proto(request)
                self.embedding.validate(batch)
                task = asyncio.create_task(self._embed_streamed(batch, context))
                task.add_done_callback(_retrieve)
                await window.put(task)
        except Exception as e:
            # Reported in order, after the responses to the requests before it.
            failed: asyncio.Future[pb.EmbedStreamResponse] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            failed.add_done_callback(_retrieve)
            await window.put(failed)
            return
        await window.put(None)

    async def _next_request(self, messages: AsyncIterator[pb.EmbedStreamRequest]) -> pb.EmbedStreamRequest | None:
        """The stream's next request (None at its end); once the server drains, EngineUnavailableError instead.

        A drain stops the reading at once, also while the client is between requests: the requests already read are
        answered, then the stream ends with UNAVAILABLE, well inside the grace period.
        """
        if self.gate.draining:
            raise EngineUnavailableError(DRAIN_MESSAGE)
        read = asyncio.ensure_future(anext(messages))
        drain = asyncio.ensure_future(self.gate.wait_draining())
        try:
            await asyncio.wait({read, drain}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
            if not read.done():
                read.cancel()  # only asks: the read is not done (nor cancelled) until the loop runs it again
        if not read.done() or read.cancelled():  # the drain came first
            raise EngineUnavailableError(DRAIN_MESSAGE)
        try:
            return read.result()
        except StopAsyncIteration:
            return None

    @unary_rpc
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model_info=convert.model_info_to_proto(self.embedding.model_info()))

    # -- index RPCs ----------------------------------------------------------------------------------------------

    @unary_rpc
    async def Neighbors(self, request: pb.NeighborsRequest, context: grpc.aio.ServicerContext) -> pb.NeighborsResponse:
        answer = await self.neighbors.search(
            convert.neighbors_search_from_proto(request), timeout=context.time_remaining()
        )
        return convert.neighbors_to_proto(answer.results, answer.metric)

    @unary_rpc
    async def DeleteItems(
        self, request: pb.DeleteItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteItemsResponse:
        name = request.collection or DEFAULT_COLLECTION
        deleted = await self.threads.run(self.index.delete, name, list(request.keys))
        return pb.DeleteItemsResponse(deleted=deleted)

    @stream_rpc
    async def ListItems(
        self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListItemsResponse]:
        name = request.collection or DEFAULT_COLLECTION
        items = await self.threads.run(self.index.fetch, name, list(request.keys) or None)
        pages = convert.items_pages_to_proto(
            items, page_size=request.page_size or PAGE_SIZE, include_vectors=request.include_vectors
        )
        for page in pages:
            yield page

    @unary_rpc
    async def GetCollectionInfo(
        self, request: pb.GetCollectionInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionInfoResponse:
        info = await self.threads.run(self.index.info, request.collection or DEFAULT_COLLECTION)
        return pb.GetCollectionInfoResponse(collection=convert.collection_info_to_proto(info))

    @unary_rpc
    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        infos = await self.threads.run(self.index.collections)
        return pb.ListCollectionsResponse(collections=[convert.collection_info_to_proto(i) for i in infos])

    @unary_rpc
    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCollectionResponse:
        info = await self.embedding.create_collection(
            request.name, dim=request.dim, metric=request.metric, index_type=request.index_type
        )
        return pb.CreateCollectionResponse(collection=convert.collection_info_to_proto(info))

    @unary_rpc
    async def DropCollection(
        self, request: pb.DropCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DropCollectionResponse:
        await self.threads.run(self.index.drop_collection, request.name)
        return pb.DropCollectionResponse()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a stream task's exception as seen (the stream reports the first one; the rest are cancelled)."""
    if not task.cancelled():
        task.exception()
