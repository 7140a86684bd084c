"""Typed Python clients of the embedserve gRPC API.

    with EmbedClient("127.0.0.1:50051") as client:
        results = client.embed([("scan-1", jpeg_bytes)])
        results[0].vector            # np.ndarray float32, unit norm (or None and results[0].error)

        client.embed([("scan-1", jpeg_bytes, {"label": "DME"})], store=True, collection="oct")   # durable on return
        hits = client.neighbors([NeighborQuery(key="scan-1")], k=10, collection="oct", filter="label == DME")
        hits[0].neighbors[0].key, hits[0].neighbors[0].score

`AsyncEmbedClient` is the same for asyncio. `RemoteEmbedder` looks like the engine to the directory job
(`info` and `embed_iter`) and streams through `EmbedStream` with a bounded number of requests in flight.
Failed calls raise `RemoteError` (with the gRPC status code); failed images come back as `ImageError`s.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.errors import image_error_from_status
from service.errors import EmbedServeError, ImageError
from service.types import CollectionInfo, Embedded, EmbedOutcome, FetchedItems, ModelInfo, Neighbor, load_item
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

VectorDType = Literal["float32", "float16"]
ImageInput = tuple[str, bytes] | tuple[str, bytes, Mapping[str, str]]
"""(key, encoded bytes) of one image, optionally with attributes to store with it (label, path, ...)."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_WIRE = {"float32": pb.VECTOR_DTYPE_FLOAT32, "float16": pb.VECTOR_DTYPE_FLOAT16}
_NUMPY = {pb.VECTOR_DTYPE_UNSPECIFIED: "<f4", pb.VECTOR_DTYPE_FLOAT32: "<f4", pb.VECTOR_DTYPE_FLOAT16: "<f2"}


class RemoteError(EmbedServeError):
    """A call to the server failed as a whole; `code` is its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One image's result: a unit-norm float32 vector (None when not requested), or its error."""

    key: str
    vector: np.ndarray | None
    error: ImageError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _image(image: ImageInput) -> pb.Image:
    key, data = image[0], image[1]
    attributes = image[2] if len(image) > 2 else {}
    return pb.Image(key=key, data=data, attributes=dict(attributes))


def make_request(
    images: Iterable[ImageInput],
    *,
    dtype: VectorDType = "float32",
    return_vectors: bool = True,
    store: bool = False,
    collection: str = "",
) -> pb.EmbedRequest:
    """The `EmbedRequest` for (key, bytes[, attributes]) tuples."""
    return pb.EmbedRequest(
        images=[_image(image) for image in images],
        return_vectors=return_vectors,
        vector_dtype=_WIRE[dtype],
        store=store,
        collection=collection,
    )


@dataclass(frozen=True, slots=True)
class QueryError:
    """Why one neighbour query failed alone: a google.rpc code, a reason tag (`key_not_found`, `invalid_image`, ...)
    and a message."""

    code: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class NeighborQuery:
    """One query of `neighbors`: exactly one of a stored `key`, a `vector` or encoded `image` bytes."""

    key: str | None = None
    vector: np.ndarray | None = None
    image: bytes | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.key, self.vector, self.image))
        if given != 1:
            raise ValueError("a NeighborQuery takes exactly one of key, vector or image")

    def to_proto(self) -> pb.Query:
        if self.key is not None:
            return pb.Query(key=self.key)
        if self.vector is not None:
            return pb.Query(vector=np.asarray(self.vector, dtype="<f4").tobytes())
        return pb.Query(image=self.image)


@dataclass(frozen=True, slots=True)
class QueryNeighbors:
    """The result of one query: its neighbours, best first, or the error it failed with."""

    neighbors: list[Neighbor]
    error: QueryError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def neighbors_request(
    queries: Sequence[NeighborQuery], *, k: int, collection: str, filter: str, exclude_self: bool
) -> pb.NeighborsRequest:
    return pb.NeighborsRequest(
        collection=collection,
        k=k,
        filter=filter,
        queries=[q.to_proto() for q in queries],
        exclude_self=exclude_self,
    )


def parse_neighbors(response: pb.NeighborsResponse) -> list[QueryNeighbors]:
    out: list[QueryNeighbors] = []
    for result in response.results:
        if result.HasField("error"):
            e = result.error
            out.append(QueryNeighbors([], QueryError(e.code, e.reason, e.message)))
            continue
        hits = [Neighbor(key=n.key, score=float(n.score), attributes=dict(n.attributes)) for n in result.neighbors]
        out.append(QueryNeighbors(hits))
    return out


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


def items_from_page(page: pb.ItemsPage) -> FetchedItems:
    """One page of `ListItems` as `FetchedItems` (vectors (n, dim) float32; (n, 0) when not requested)."""
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


def parse_response(response: pb.EmbedResponse) -> list[EmbedResult]:
    """`EmbedResult`s of a response, vectors decoded to float32."""
    results: list[EmbedResult] = []
    for r in response.results:
        if r.HasField("error"):
            results.append(
                EmbedResult(r.key, None, image_error_from_status(r.error.code, r.error.reason, r.error.message))
            )
            continue
        vector = None
        if r.vector:
            vector = np.frombuffer(r.vector, dtype=_NUMPY.get(r.dtype, "<f4")).astype(np.float32)
            if vector.shape[0] != r.dim:
                raise RemoteError(
                    grpc.StatusCode.DATA_LOSS, f"vector of {r.key!r} has {vector.shape[0]} values, not {r.dim}"
                )
        results.append(EmbedResult(r.key, vector, None))
    return results


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


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The `authorization: Bearer` metadata for `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if tls or root_certificates is not None:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A blocking channel to `target`: TLS when asked (or given a root certificate), large messages allowed."""
    options = _channel_options(max_message_bytes)
    creds = _credentials(tls, root_certificates)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def open_aio_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """The asyncio twin of `open_channel`."""
    options = _channel_options(max_message_bytes)
    creds = _credentials(tls, root_certificates)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


def _remote_error(e: grpc.RpcError) -> RemoteError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return RemoteError(code, details or "")


class EmbedClient:
    """Blocking client. `tls=True` (with optional `root_certificates` PEM) for a TLS server; `token` for auth."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.channel = open_channel(
            target, tls=tls, root_certificates=root_certificates, max_message_bytes=max_message_bytes
        )
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = auth_metadata(token)
        self.timeout = timeout

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
        request = make_request(images, dtype=dtype, return_vectors=return_vectors, store=store, collection=collection)
        try:
            response = self.stub.Embed(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        return parse_response(response)

    def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e

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
        request = neighbors_request(queries, k=k, collection=collection, filter=filter, exclude_self=exclude_self)
        return parse_neighbors(self._unary(self.stub.Neighbors, request, timeout))

    def delete_items(self, keys: Sequence[str], *, collection: str = "", timeout: float | None = None) -> int:
        """Delete items by key (durable on return); how many existed."""
        request = pb.DeleteItemsRequest(collection=collection, keys=list(keys))
        return int(self._unary(self.stub.DeleteItems, request, timeout).deleted)

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
        request = pb.ListItemsRequest(
            collection=collection, keys=list(keys or ()), page_size=page_size, include_vectors=include_vectors
        )
        call = self.stub.ListItems(request, timeout=timeout, metadata=self.metadata)
        try:
            for page in call:
                yield items_from_page(page)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        finally:
            call.cancel()

    def fetch_items(
        self, *, collection: str = "", keys: Sequence[str] | None = None, include_vectors: bool = True
    ) -> FetchedItems:
        """All of `iter_items` in one `FetchedItems`."""
        pages = list(self.iter_items(collection=collection, keys=keys, include_vectors=include_vectors))
        if not pages:
            return FetchedItems([], np.zeros((0, 0), np.float32), [])
        return FetchedItems(
            keys=[key for page in pages for key in page.keys],
            vectors=np.concatenate([page.vectors for page in pages]),
            attributes=[a for page in pages for a in page.attributes],
        )

    def collection_info(self, collection: str = "", *, timeout: float | None = None) -> CollectionInfo:
        request = pb.GetCollectionInfoRequest(collection=collection)
        return collection_info_from_proto(self._unary(self.stub.GetCollectionInfo, request, timeout))

    def list_collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        response = self._unary(self.stub.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [collection_info_from_proto(info) for info in response.collections]

    def create_collection(
        self, name: str, *, dim: int = 0, metric: str = "", index_type: str = "", timeout: float | None = None
    ) -> CollectionInfo:
        """Create an empty collection (dim 0 = the model's; metric and index type "" = the server's defaults)."""
        request = pb.CreateCollectionRequest(name=name, dim=dim, metric=metric, index_type=index_type)
        return collection_info_from_proto(self._unary(self.stub.CreateCollection, request, timeout))

    def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        self._unary(self.stub.DropCollection, pb.DropCollectionRequest(name=name), timeout)

    def embed_stream(
        self, batches: Iterable[Sequence[ImageInput]], *, dtype: VectorDType = "float32", timeout: float | None = None
    ) -> Iterator[list[EmbedResult]]:
        """Stream batches through `EmbedStream`; yields the results of each batch, in order.

        `timeout` (default none) bounds the whole stream. gRPC flow control limits how far it reads ahead.
        """
        requests = (make_request(batch, dtype=dtype) for batch in batches)
        call = self.stub.EmbedStream(requests, timeout=timeout, metadata=self.metadata)
        try:
            for response in call:
                yield parse_response(response)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        finally:
            call.cancel()

    def model_info(self) -> ModelInfo:
        try:
            info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        return model_info_from_proto(info)

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """The health status name (`SERVING`, `NOT_SERVING`, ...) of `service` ("" = the whole server)."""
        try:
            response = self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        """Block until health says SERVING (the server may still be warming up)."""
        try:
            response = self.health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self.metadata)
            for status in response:
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    response.cancel()
                    return
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        raise RemoteError(grpc.StatusCode.UNAVAILABLE, "health stream ended before SERVING")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbedClient:
    """asyncio client; the same methods as `EmbedClient`, awaited."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.channel = open_aio_channel(
            target, tls=tls, root_certificates=root_certificates, max_message_bytes=max_message_bytes
        )
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = auth_metadata(token)
        self.timeout = timeout

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
        request = make_request(images, dtype=dtype, return_vectors=return_vectors, store=store, collection=collection)
        try:
            response = await self.stub.Embed(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        return parse_response(response)

    async def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e

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
        request = neighbors_request(queries, k=k, collection=collection, filter=filter, exclude_self=exclude_self)
        return parse_neighbors(await self._unary(self.stub.Neighbors, request, timeout))

    async def delete_items(self, keys: Sequence[str], *, collection: str = "", timeout: float | None = None) -> int:
        request = pb.DeleteItemsRequest(collection=collection, keys=list(keys))
        return int((await self._unary(self.stub.DeleteItems, request, timeout)).deleted)

    async def collection_info(self, collection: str = "", *, timeout: float | None = None) -> CollectionInfo:
        request = pb.GetCollectionInfoRequest(collection=collection)
        return collection_info_from_proto(await self._unary(self.stub.GetCollectionInfo, request, timeout))

    async def list_collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        response = await self._unary(self.stub.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [collection_info_from_proto(info) for info in response.collections]

    async def embed_stream(
        self,
        batches: AsyncIterable[Sequence[ImageInput]] | Iterable[Sequence[ImageInput]],
        *,
        dtype: VectorDType = "float32",
        timeout: float | None = None,
    ) -> AsyncIterator[list[EmbedResult]]:
        async def requests() -> AsyncIterator[pb.EmbedRequest]:
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield make_request(batch, dtype=dtype)
            else:
                for batch in batches:
                    yield make_request(batch, dtype=dtype)

        call = self.stub.EmbedStream(requests(), timeout=timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield parse_response(response)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        finally:
            call.cancel()

    async def model_info(self) -> ModelInfo:
        try:
            info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        return model_info_from_proto(info)

    async def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        try:
            response = await self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class KeyedLoadable(Protocol):
    """An input of `RemoteEmbedder.embed_iter`: a key and `load()` -> bytes (raising `ImageError` on failure)."""

    @property
    def key(self) -> str: ...

    def load(self) -> bytes: ...


ItemT = TypeVar("ItemT", bound=KeyedLoadable)


@dataclass(slots=True)
class _Chunk:
    """Items sent in one request; `loaded` holds their bytes or the error that kept them from being sent."""

    items: list[Any]
    loaded: list[bytes | ImageError]


class RemoteEmbedder:
    """The engine's job interface (`info`, `embed_iter`) backed by a server's `EmbedStream`.

    Items are loaded on gRPC's request thread, `batch_size` per request, and at most `max_in_flight` requests are
    unanswered at a time, so memory stays bounded however long the input is. With `store`, the server also upserts
    the vectors into `collection`, with each item's `label` and `path` (when it has them) as attributes, and answers
    each request only once it is durable.
    """

    def __init__(
        self,
        target: str,
        *,
        batch_size: int = 32,
        max_in_flight: int = 4,
        dtype: VectorDType = "float32",
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        store: bool = False,
        collection: str = "",
    ) -> None:
        if batch_size <= 0 or max_in_flight <= 0:
            raise ValueError(f"batch_size={batch_size} and max_in_flight={max_in_flight} must be positive")
        self.client = EmbedClient(
            target, token=token, tls=tls, root_certificates=root_certificates, max_message_bytes=max_message_bytes
        )
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.dtype = dtype
        self.store = store
        self.collection = collection
        self.info: ModelInfo = self.client.model_info()

    def embed_iter(self, items: Iterable[ItemT]) -> Iterator[Embedded[ItemT]]:
        """Yield every item with its outcome, in input order (unreadable items carry their load error)."""
        iterator = iter(items)
        sent: deque[_Chunk] = deque()
        slots = threading.Semaphore(self.max_in_flight)
        stop = threading.Event()

        def requests() -> Iterator[pb.EmbedRequest]:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                chunk = list(itertools.islice(iterator, self.batch_size))
                if not chunk:
                    return
                loaded = [load_item(item) for item in chunk]
                sent.append(_Chunk(items=chunk, loaded=loaded))
                yield pb.EmbedRequest(
                    images=[
                        pb.Image(key=item.key, data=data, attributes=_attributes(item) if self.store else {})
                        for item, data in zip(chunk, loaded, strict=True)
                        if not isinstance(data, ImageError)
                    ],
                    vector_dtype=_WIRE[self.dtype],
                    store=self.store,
                    collection=self.collection,
                )

        call = self.client.stub.EmbedStream(requests(), metadata=self.client.metadata)
        try:
            for response in call:
                chunk = sent.popleft()
                slots.release()
                results = iter(parse_response(response))
                for item, data in zip(chunk.items, chunk.loaded, strict=True):
                    if isinstance(data, ImageError):
                        outcome = EmbedOutcome(error=data)
                    else:
                        result = next(results)
                        outcome = EmbedOutcome(vector=result.vector, error=result.error)
                    yield Embedded(item, outcome)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        finally:
            stop.set()
            slots.release()  # wake the request thread if it waits for a slot, so it sees `stop`
            call.cancel()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attributes(item: object) -> dict[str, str]:
    """`label` and `path` of a job item (a `FileItem`), when it has them, as attributes to store."""
    attributes: dict[str, str] = {}
    label = getattr(item, "label", None)
    if label is not None:
        attributes["label"] = str(label)
    path = getattr(item, "path", None)
    if path is not None:
        attributes["path"] = str(path)
    return attributes
