"""Typed Python clients of the embedserve gRPC API.

    with EmbedClient("127.0.0.1:50051") as client:
        results = client.embed([("scan-1", jpeg_bytes)])
        results[0].vector            # np.ndarray float32, unit norm (or None and results[0].error)

`AsyncEmbedClient` is the same for asyncio. `RemoteEmbedder` looks like the engine to the directory job
(`info` and `embed_iter`) and streams through `EmbedStream` with a bounded number of requests in flight.
Failed calls raise `RemoteError` (with the gRPC status code); failed images come back as `ImageError`s.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.embedserve.v1 import embedder_pb2 as pb
from service._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc
from service.engine import Embedded, EmbedOutcome, ModelInfo
from service.errors import EmbedServeError, ImageError
from service.status import image_error_from_status

VectorDType = Literal["float32", "float16"]
ImageInput = tuple[str, bytes]
"""(key, encoded bytes) of one image."""

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


def make_request(
    images: Iterable[ImageInput], *, dtype: VectorDType = "float32", return_vectors: bool = True
) -> pb.EmbedRequest:
    """The `EmbedRequest` for (key, bytes) pairs."""
    return pb.EmbedRequest(
        images=[pb.Image(key=key, data=data) for key, data in images],
        return_vectors=return_vectors,
        vector_dtype=_WIRE[dtype],
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


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


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
        options = _channel_options(max_message_bytes)
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    def embed(
        self,
        images: Sequence[ImageInput],
        *,
        dtype: VectorDType = "float32",
        return_vectors: bool = True,
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        """Embed (key, bytes) pairs in one call; one result per image, in order."""
        request = make_request(images, dtype=dtype, return_vectors=return_vectors)
        try:
            response = self.stub.Embed(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        return parse_response(response)

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
        options = _channel_options(max_message_bytes)
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    async def embed(
        self,
        images: Sequence[ImageInput],
        *,
        dtype: VectorDType = "float32",
        return_vectors: bool = True,
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        request = make_request(images, dtype=dtype, return_vectors=return_vectors)
        try:
            response = await self.stub.Embed(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _remote_error(e) from e
        return parse_response(response)

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
    unanswered at a time, so memory stays bounded however long the input is.
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
    ) -> None:
        if batch_size <= 0 or max_in_flight <= 0:
            raise ValueError(f"batch_size={batch_size} and max_in_flight={max_in_flight} must be positive")
        self.client = EmbedClient(
            target, token=token, tls=tls, root_certificates=root_certificates, max_message_bytes=max_message_bytes
        )
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.dtype = dtype
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
                loaded = [_load(item) for item in chunk]
                sent.append(_Chunk(items=chunk, loaded=loaded))
                yield pb.EmbedRequest(
                    images=[
                        pb.Image(key=item.key, data=data)
                        for item, data in zip(chunk, loaded, strict=True)
                        if not isinstance(data, ImageError)
                    ],
                    vector_dtype=_WIRE[self.dtype],
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


def _load(item: KeyedLoadable) -> bytes | ImageError:
    try:
        return item.load()
    except ImageError as e:
        return e
