"""The gRPC server: `embedserve.v1.Embedder`, standard health, reflection, auth, metrics, graceful shutdown.

    server, port = await create_server(cfg)      # binds (port 0 picks a free one), opens the index in cfg.data_dir;
    await server.start()                         # the engine is built on start()
    ...
    await server.stop(grace=cfg.server.grace_seconds)

Other services join the same server through `create_server(cfg, extra_servicers=[hook])`: each hook is called as
`hook(grpc_server, embed_server)` before the server starts and registers its servicer; it reaches the vector index
as `embed_server.index` and the metrics as `embed_server.metrics`.

`run_server(cfg)` does all of it in the foreground until SIGTERM or SIGINT and returns the exit code.

Transport only: requests are validated here and handed to the batcher; errors become status codes here, through
`service.api.errors`. The server never touches a tensor.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.errors import (
    InvalidRequestError,
    code_number,
    image_status,
    rpc_status,
)
from service.config import Config
from service.embedding.batcher import BatchEngine, Batcher, EngineUnavailableError
from service.errors import EmbedServeError
from service.index.filter import parse_filter
from service.index.store import DEFAULT_COLLECTION, MAX_K, CollectionInfo, IndexStore, check_collection_name
from service.metrics import Metrics, MetricsEndpoint, cuda_memory_probe
from service.types import EmbedOutcome, ModelInfo
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Embedder"].full_name
"""`embedserve.v1.Embedder`."""

STREAM_WINDOW = 4
"""Requests of one EmbedStream in the batcher at once; the server reads no further until the oldest is answered."""

_OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Callable without the token, so that load balancers and orchestrators can probe health."""

_KNOWN_SERVICES = frozenset({SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME})
_DEFAULT_K = 10
_PAGE_SIZE = 1024
_INDEX_THREADS = 8
"""Threads for index calls; concurrent stores wait on one shared fsync (group commit) in them."""
T = TypeVar("T")
_DTYPES = {
    pb.VECTOR_DTYPE_UNSPECIFIED: "<f4",
    pb.VECTOR_DTYPE_FLOAT32: "<f4",
    pb.VECTOR_DTYPE_FLOAT16: "<f2",
}

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("embedserve_request_id", default="")
"""The id of the call being handled (from `x-request-id` metadata, else generated); returned as `x-request-id`."""


class ServingEngine(BatchEngine, Protocol):
    """What the server needs of an engine: the batcher's two stages and `info`."""

    @property
    def info(self) -> ModelInfo: ...


# -- servicer ----------------------------------------------------------------------------------------------------


class EmbedderServicer(pb_grpc.EmbedderServicer):
    """`embedserve.v1.Embedder` over a batcher and the index; embedding is UNAVAILABLE until `attach()`."""

    def __init__(self, cfg: Config, index: IndexStore, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.metrics = metrics if metrics is not None else Metrics()
        self.batcher: Batcher | None = None
        self.info: ModelInfo | None = None
        self.index_pool = ThreadPoolExecutor(max_workers=_INDEX_THREADS, thread_name_prefix="embedserve-index")
        self.max_images = min(cfg.server.max_images_per_request, cfg.batcher.max_queue_size)
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Count a call in flight; during a drain, refuse it with UNAVAILABLE (not a transport-level CANCELLED)."""
        if self.draining:
            raise EngineUnavailableError("the server is shutting down; retry on another replica")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new calls and wait up to `grace` seconds for the in-flight ones; True when all finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            return False
        return True

    def attach(self, batcher: Batcher, info: ModelInfo) -> None:
        self.batcher = batcher
        self.info = info

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        try:
            with self._call():
                self._validate(request)
                return await self._embed(request, context, wait=False)
        except Exception as e:
            await _abort(context, e)

    async def EmbedStream(  # gRPC method names
        self, request_iterator: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedResponse]:
        # A reader task feeds a bounded queue of per-request tasks; this generator answers them in order. When the
        # queue is full the reader stops reading, and gRPC flow control holds the client back.
        try:
            with self._call():
                window: asyncio.Queue[asyncio.Future[pb.EmbedResponse] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
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
        except Exception as e:
            await _abort(context, e)

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[pb.EmbedRequest],
        context: grpc.aio.ServicerContext,
        window: asyncio.Queue[asyncio.Future[pb.EmbedResponse] | None],
    ) -> None:
        try:
            async for request in request_iterator:
                self._validate(request)
                task = asyncio.create_task(self._embed(request, context, wait=True))
                task.add_done_callback(_retrieve)
                await window.put(task)
        except Exception as e:
            # Reported in order, after the responses to the requests before it.
            failed: asyncio.Future[pb.EmbedResponse] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            failed.add_done_callback(_retrieve)
            await window.put(failed)
            return
        await window.put(None)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self.info is None:
            await _abort(context, EngineUnavailableError("the model is still loading; retry shortly"))
        i = self.info
        return pb.ModelInfo(
            backbone=i.backbone,
            embedding_dim=i.embedding_dim,
            input_size=i.input_size,
            precision=i.precision,
            device=i.device,
            decode_backend=i.decode_backend,
            resize=i.resize,
            pad=i.pad,
            version=i.version,
        )

    def _validate(self, request: pb.EmbedRequest) -> None:
        n = len(request.images)
        if n > self.max_images:
            raise InvalidRequestError(
                f"{n} images in one request; this server takes at most {self.max_images} "
                "(server.max_images_per_request, batcher.max_queue_size): split the request"
            )
        if request.store:
            check_collection_name(request.collection or DEFAULT_COLLECTION)
            if any(not image.key for image in request.images):
                raise InvalidRequestError("store=true needs a non-empty key on every image")
        if request.vector_dtype not in _DTYPES:
            raise InvalidRequestError(f"unknown vector_dtype {request.vector_dtype}; use FLOAT32 or FLOAT16")

    async def _embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, *, wait: bool
    ) -> pb.EmbedResponse:
        if self.batcher is None or self.info is None:
            raise EngineUnavailableError("the model is still loading; retry shortly")
        outcomes = await self.batcher.embed(
            [image.data for image in request.images], timeout=context.time_remaining(), wait=wait
        )
        if request.store:
            await self._store(request, outcomes, self.info.embedding_dim)
        return self._response(request, outcomes, self.info.embedding_dim)

    async def _in_index_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a (blocking) index call in the index threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.index_pool, functools.partial(fn, *args, **kwargs))

    async def _store(self, request: pb.EmbedRequest, outcomes: Sequence[EmbedOutcome], dim: int) -> None:
        """Upsert the embedded images into the request's collection; returns once durable."""
        done = [
            (image, outcome.vector)
            for image, outcome in zip(request.images, outcomes, strict=True)
            if outcome.vector is not None
        ]
        if not done:
            return
        name = request.collection or DEFAULT_COLLECTION
        if not self.index.has_collection(name):
            await self._in_index_thread(self.index.create_collection, name, dim=dim, exist_ok=True)
        started = time.perf_counter()
        await self._in_index_thread(
            self.index.upsert,
            name,
            [image.key for image, _ in done],
            np.stack([vector for _, vector in done]),
            [dict(image.attributes) for image, _ in done],
        )
        self.metrics.stage_duration.labels(stage="index").observe(time.perf_counter() - started)

    # -- index RPCs ----------------------------------------------------------------------------------------------

    async def Neighbors(self, request: pb.NeighborsRequest, context: grpc.aio.ServicerContext) -> pb.NeighborsResponse:
        try:
            with self._call():
                return await self._neighbors(request, context)
        except Exception as e:
            await _abort(context, e)

    async def _neighbors(self, request: pb.NeighborsRequest, context: grpc.aio.ServicerContext) -> pb.NeighborsResponse:
        name = request.collection or DEFAULT_COLLECTION
        k = request.k or _DEFAULT_K
        if not 1 <= k <= MAX_K:
            raise InvalidRequestError(f"k={k} must be 1..{MAX_K}")
        if len(request.queries) > self.max_images:
            raise InvalidRequestError(f"{len(request.queries)} queries in one request; at most {self.max_images}")
        flt = parse_filter(request.filter)
        info: CollectionInfo = await self._in_index_thread(self.index.info, name)
        n = len(request.queries)
        vectors: list[np.ndarray | None] = [None] * n
        errors: dict[int, tuple[int, str, str]] = {}
        key_positions = [i for i, q in enumerate(request.queries) if q.WhichOneof("kind") == "key"]
        image_positions = [i for i, q in enumerate(request.queries) if q.WhichOneof("kind") == "image"]
        for i, query in enumerate(request.queries):
            kind = query.WhichOneof("kind")
            if kind is None:
                raise InvalidRequestError(f"query {i} has no key, vector or image")
            if kind == "vector":
                if len(query.vector) != 4 * info.dim:
                    raise InvalidRequestError(
                        f"query {i}: a vector of {len(query.vector)} bytes; collection {name!r} wants {info.dim} "
                        f"little-endian float32 values ({4 * info.dim} bytes)"
                    )
                vectors[i] = np.frombuffer(query.vector, dtype="<f4").astype(np.float32)
        if key_positions:
            found = await self._in_index_thread(
                self.index.fetch_vectors, name, [request.queries[i].key for i in key_positions]
            )
            for i, vector in zip(key_positions, found, strict=True):
                if vector is None:
                    message = f"collection {name!r} has no item with key {request.queries[i].key!r}"
                    errors[i] = (code_number(grpc.StatusCode.NOT_FOUND), "key_not_found", message)
                vectors[i] = vector
        if image_positions:
            if self.batcher is None or self.info is None:
                raise EngineUnavailableError("the model is still loading; retry shortly")
            if self.info.embedding_dim != info.dim:
                raise InvalidRequestError(
                    f"collection {name!r} holds {info.dim}-d vectors but the model makes {self.info.embedding_dim}-d "
                    "ones; image queries need a collection of this model's embeddings"
                )
            outcomes = await self.batcher.embed(
                [request.queries[i].image for i in image_positions], timeout=context.time_remaining()
            )
            for i, outcome in zip(image_positions, outcomes, strict=True):
                if outcome.error is not None:
                    errors[i] = image_status(outcome.error)
                vectors[i] = outcome.vector
        ready = [i for i in range(n) if vectors[i] is not None]
        response = pb.NeighborsResponse(metric=info.metric)
        results = [response.results.add() for _ in range(n)]
        for i, (code, reason, message) in errors.items():
            results[i].error.code, results[i].error.reason, results[i].error.message = code, reason, message
        if not ready:
            return response
        exclude = [
            request.queries[i].key if request.exclude_self and request.queries[i].WhichOneof("kind") == "key" else None
            for i in ready
        ]
        started = time.perf_counter()
        found_neighbors = await self._in_index_thread(
            self.index.search,
            name,
            np.stack([vectors[i] for i in ready]),  # type: ignore[misc]
            k,
            filter=flt,
            exclude_keys=exclude,
        )
        self.metrics.index_search_duration.observe(time.perf_counter() - started)
        for i, hits in zip(ready, found_neighbors, strict=True):
            for hit in hits:
                results[i].neighbors.add(key=hit.key, score=hit.score, attributes=hit.attributes)
        return response

    async def DeleteItems(
        self, request: pb.DeleteItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteItemsResponse:
        try:
            with self._call():
                name = request.collection or DEFAULT_COLLECTION
                deleted = await self._in_index_thread(self.index.delete, name, list(request.keys))
                return pb.DeleteItemsResponse(deleted=deleted)
        except Exception as e:
            await _abort(context, e)

    async def ListItems(
        self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ItemsPage]:
        try:
            with self._call():
                name = request.collection or DEFAULT_COLLECTION
                page_size = request.page_size or _PAGE_SIZE
                if page_size < 0:
                    raise InvalidRequestError(f"page_size={page_size} must be positive")
                items = await self._in_index_thread(self.index.fetch, name, list(request.keys) or None)
                dim = int(items.vectors.shape[1])
                for start in range(0, max(len(items.keys), 1), page_size):
                    page = pb.ItemsPage(dim=dim)
                    for row in range(start, min(start + page_size, len(items.keys))):
                        vector = items.vectors[row].astype("<f4").tobytes() if request.include_vectors else b""
                        page.items.add(key=items.keys[row], vector=vector, attributes=items.attributes[row])
                    yield page
        except Exception as e:
            await _abort(context, e)

    async def GetCollectionInfo(
        self, request: pb.GetCollectionInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.CollectionInfo:
        try:
            with self._call():
                name = request.collection or DEFAULT_COLLECTION
                return _collection_info(await self._in_index_thread(self.index.info, name))
        except Exception as e:
            await _abort(context, e)

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        try:
            with self._call():
                infos = await self._in_index_thread(self.index.collections)
                return pb.ListCollectionsResponse(collections=[_collection_info(i) for i in infos])
        except Exception as e:
            await _abort(context, e)

    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CollectionInfo:
        try:
            with self._call():
                dim = request.dim
                if dim == 0:
                    if self.info is None:
                        raise EngineUnavailableError("the model is still loading; pass dim or retry shortly")
                    dim = self.info.embedding_dim
                info = await self._in_index_thread(
                    self.index.create_collection,
                    request.name,
                    dim=dim,
                    metric=request.metric or None,
                    index_type=request.index_type or None,
                )
                return _collection_info(info)
        except Exception as e:
            await _abort(context, e)

    async def DropCollection(
        self, request: pb.DropCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DropCollectionResponse:
        try:
            with self._call():
                await self._in_index_thread(self.index.drop_collection, request.name)
                return pb.DropCollectionResponse()
        except Exception as e:
            await _abort(context, e)

    @staticmethod
    def _response(request: pb.EmbedRequest, outcomes: Sequence[EmbedOutcome], dim: int) -> pb.EmbedResponse:
        return_vectors = request.return_vectors if request.HasField("return_vectors") else True
        wire = _DTYPES[request.vector_dtype]
        dtype = pb.VECTOR_DTYPE_FLOAT16 if wire == "<f2" else pb.VECTOR_DTYPE_FLOAT32
        response = pb.EmbedResponse()
        for image, outcome in zip(request.images, outcomes, strict=True):
            result = response.results.add(key=image.key, dim=dim, dtype=dtype)
            if outcome.error is not None:
                code, reason, message = image_status(outcome.error)
                result.error.code, result.error.reason, result.error.message = code, reason, message
            elif return_vectors and outcome.vector is not None:
                result.vector = outcome.vector.astype(wire).tobytes()
        return response


def _collection_info(info: CollectionInfo) -> pb.CollectionInfo:
    return pb.CollectionInfo(
        name=info.name,
        dim=info.dim,
        metric=info.metric,
        index_type=info.index_type,
        count=info.count,
        trained=info.trained,
        bytes_on_disk=info.bytes_on_disk,
        search_backend=info.search_backend,
    )


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a stream task's exception as seen (the stream reports the first one; the rest are cancelled)."""
    if not task.cancelled():
        task.exception()


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status for `error`; unknown errors are logged and sent as INTERNAL without details."""
    if isinstance(error, asyncio.CancelledError | grpc.aio.AbortError):
        raise error
    rid = request_id.get()
    code, message = rpc_status(error, rid)
    if not isinstance(error, EmbedServeError):
        logger.error("request %s failed with an internal error", rid, exc_info=error)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # unreachable: abort raises


# -- interceptors ------------------------------------------------------------------------------------------------


def _method_label(full_method: str, known_services: frozenset[str] | set[str] = _KNOWN_SERVICES) -> str:
    """The `method` label of a call: the short name for our services, `other` for anything else."""
    service, _, method = full_method.lstrip("/").partition("/")
    return method if service in known_services and method.isidentifier() else "other"


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler like `handler` (same streaming kind and codecs) that runs `behavior`."""
    kind = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _final_code(error: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if error is None:
        return context.code() or grpc.StatusCode.OK
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class ObserveInterceptor(grpc.aio.ServerInterceptor):
    """Request id, one debug log line per call (warning for server-side failures), request metrics."""

    def __init__(self, metrics: Metrics, known_services: set[str] | None = None) -> None:
        self.metrics = metrics
        self.known_services = known_services if known_services is not None else set(_KNOWN_SERVICES)
        """Services whose method names are metric labels (others count as `other`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = _method_label(details.method, self.known_services)
        incoming = dict(details.invocation_metadata or ()).get("x-request-id", "")
        behavior = _behavior(handler)
        observer = _CallObserver(self.metrics, method, incoming)

        if handler.response_streaming and inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await observer.begin(context)
                error: BaseException | None = None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    observer.end(context, error)

            return _rebuild(handler, streaming)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await observer.begin(context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                observer.end(context, error)

        return _rebuild(handler, unary)


class _CallObserver:
    """The bookkeeping of one call for `ObserveInterceptor`."""

    __slots__ = ("incoming", "method", "metrics", "rid", "start", "token")

    def __init__(self, metrics: Metrics, method: str, incoming: str) -> None:
        self.metrics = metrics
        self.method = method
        self.incoming = incoming
        self.rid = ""
        self.start = 0.0
        self.token: contextvars.Token[str] | None = None

    async def begin(self, context: grpc.aio.ServicerContext) -> None:
        self.start = time.monotonic()
        # A caller's id is kept only when it is short and printable; it goes into logs, never into labels.
        ok = 0 < len(self.incoming) <= 64 and self.incoming.isprintable()
        self.rid = self.incoming if ok else uuid.uuid4().hex[:16]
        self.token = request_id.set(self.rid)
        await context.send_initial_metadata((("x-request-id", self.rid),))

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        elapsed = time.monotonic() - self.start
        code = _final_code(error, context)
        self.metrics.requests.labels(method=self.method, code=code.name).inc()
        self.metrics.request_duration.labels(method=self.method).observe(elapsed)
        server_side = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE)
        level = logging.WARNING if server_side else logging.DEBUG
        logger.log(level, "rpc %s %s %.1f ms request_id=%s", self.method, code.name, elapsed * 1000, self.rid)
        if self.token is not None:
            request_id.reset(self.token)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED (health checks stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in _OPEN_METHODS:
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._expected):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "this server needs `authorization: Bearer <token>` metadata"
            )

        return _rebuild(handler, deny)


# -- the server --------------------------------------------------------------------------------------------------


class EmbedServer:
    """A bound gRPC server with its health, metrics endpoint and (once started) engine and batcher."""

    def __init__(
        self,
        cfg: Config,
        *,
        grpc_server: grpc.aio.Server,
        port: int,
        servicer: EmbedderServicer,
        health_servicer: health.aio.HealthServicer,
        metrics: Metrics,
        engine: ServingEngine | None,
        index: IndexStore,
        owns_index: bool = True,
    ) -> None:
        self.cfg = cfg
        self.grpc_server = grpc_server
        self.port = port
        self.servicer = servicer
        self.health = health_servicer
        self.metrics = metrics
        self.engine = engine
        self._owns_engine = engine is None
        self.index = index
        """The vector index (every collection under `cfg.data_dir`), open from `create_server` to `stop`."""
        self._owns_index = owns_index
        self.batcher: Batcher | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._loading: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None
        """Why the server cannot serve any more (the engine did not build or its batch loop died)."""

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    async def start(self) -> None:
        """Start serving (NOT_SERVING until the engine is warm) and the metrics endpoint."""
        await self.grpc_server.start()
        logger.info("embedserve listening on %s:%d", self.cfg.server.host, self.port)
        if self.cfg.server.metrics_port >= 0:
            self.metrics_endpoint = self.metrics.serve(self.cfg.server.metrics_host, self.cfg.server.metrics_port)
        if self.engine is not None:
            await self._attach(self.engine)
        else:
            self._loading = asyncio.create_task(self._load_engine(), name="embedserve-load-engine")

    async def _load_engine(self) -> None:
        from service.embedding.engine import Engine

        try:
            engine = await asyncio.to_thread(Engine.from_config, self.cfg)
        except Exception as e:
            logger.error("the engine could not be built", exc_info=e)
            self._fail(e)
            return
        self.engine = engine
        await self._attach(engine)

    async def _attach(self, engine: ServingEngine) -> None:
        batcher = Batcher(
            engine,
            self.cfg.batcher,
            metrics=self.metrics,
            decode_workers=self.cfg.engine.prefetch_batches,
            prefetch_batches=self.cfg.engine.prefetch_batches,
            on_failure=self._fail,
        )
        await batcher.start()
        self.batcher = batcher
        info = engine.info
        self.servicer.attach(batcher, info)
        if info.device.startswith("cuda"):
            probe = getattr(engine, "memory_bytes", None) or cuda_memory_probe(info.device)
            self.metrics.track_gpu_memory(probe)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s (%d-d) on %s", info.backbone, info.embedding_dim, info.device)

    def _fail(self, error: BaseException) -> None:
        self.failure = error
        self._failed.set()
        for name in ("", SERVICE_NAME):
            asyncio.get_running_loop().create_task(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))

    async def wait_failed(self) -> BaseException:
        """Return once the server can no longer serve, with the reason."""
        await self._failed.wait()
        if self.failure is None:  # the event is only set by _fail
            raise RuntimeError("failure event set without a failure")
        return self.failure

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then release everything."""
        await self.health.enter_graceful_shutdown()
        grace = self.cfg.server.grace_seconds if grace is None else grace
        started = time.monotonic()
        if not await self.servicer.drain(grace):
            logger.warning("grace period of %.0f s over; cancelling the calls still in flight", grace)
        await self.grpc_server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        close = getattr(self.engine, "close", None)
        if self._owns_engine and close is not None:
            await asyncio.to_thread(close)
        self.servicer.index_pool.shutdown(wait=True)
        if self._owns_index:
            await asyncio.to_thread(self.index.close)
        logger.info("embedserve stopped")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


ServicerHook = Callable[[grpc.aio.Server, "EmbedServer"], object]
"""Registers an extra servicer: called as `hook(grpc_server, embed_server)` before the server starts."""


async def create_server(
    cfg: Config,
    engine: ServingEngine | None = None,
    *,
    index: IndexStore | None = None,
    extra_servicers: Sequence[ServicerHook] = (),
    extra_service_names: Sequence[str] = (),
) -> tuple[EmbedServer, int]:
    """Build and bind the server (port 0 picks a free port); returns it, not started, and the bound port.

    With `engine=None` the engine is built from `cfg` on `start()`, off the event loop, while health says
    NOT_SERVING; a given engine is used as is and is not closed by `stop()`. The index is opened here from
    `cfg.data_dir` (snapshot + log replay, off the event loop) unless one is given (then `stop()` leaves it open).
    `extra_servicers` hooks register more services on the same server (see the module docstring); name their full
    service names in `extra_service_names` for reflection, health and per-method metrics.
    """
    s = cfg.server
    metrics = Metrics()
    known_services = set(_KNOWN_SERVICES) | set(extra_service_names)
    interceptors: list[grpc.aio.ServerInterceptor] = [ObserveInterceptor(metrics, known_services)]
    if s.auth_token:
        interceptors.append(AuthInterceptor(s.auth_token))
    elif s.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an auth token: anyone who can reach it can use it", s.host)
    grpc_server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    owns_index = index is None
    if index is None:
        index = await asyncio.to_thread(IndexStore.open, cfg, on_fsync=metrics.observe_fsync)
    metrics.track_index(index.counts)
    servicer = EmbedderServicer(cfg, index, metrics)
    pb_grpc.add_EmbedderServicer_to_server(servicer, grpc_server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(sorted(known_services), grpc_server)

    address = _address(s.host, s.port)
    if s.tls_cert:
        key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()
        port = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = grpc_server.add_insecure_port(address)
    if not port:
        if owns_index:
            await asyncio.to_thread(index.close)
        raise OSError(f"cannot listen on {address}; is the port in use? (server.port=0 picks a free one)")
    server = EmbedServer(
        cfg,
        grpc_server=grpc_server,
        port=int(port),
        servicer=servicer,
        health_servicer=health_servicer,
        metrics=metrics,
        engine=engine,
        index=index,
        owns_index=owns_index,
    )
    for hook in extra_servicers:
        hook(grpc_server, server)
    return server, int(port)


async def serve(
    cfg: Config, *, extra_servicers: Sequence[ServicerHook] = (), extra_service_names: Sequence[str] = ()
) -> int:
    """Serve until SIGTERM/SIGINT (exit code 0 after a graceful stop) or until the engine fails (1)."""
    server, _ = await create_server(cfg, extra_servicers=extra_servicers, extra_service_names=extra_service_names)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(server.wait_failed())
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    code = 1 if failing.done() else 0
    if code == 0:
        logger.info("stopping: finishing in-flight calls (grace %.0f s)", cfg.server.grace_seconds)
    for task in (stopping, failing):
        task.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.stop(cfg.server.grace_seconds)
    return code


def run_server(
    cfg: Config, *, extra_servicers: Sequence[ServicerHook] = (), extra_service_names: Sequence[str] = ()
) -> int:
    """Build the engine, serve until SIGTERM or SIGINT, stop gracefully; the process exit code.

    0 after a graceful stop, 1 when the engine could not be built or failed, the port could not be bound or the
    index could not be opened (e.g. its data directory is in use). A second signal during the grace period ends the
    process at once (the handlers are removed on the first). `extra_servicers`: see `create_server`.
    """
    try:
        return asyncio.run(serve(cfg, extra_servicers=extra_servicers, extra_service_names=extra_service_names))
    except (OSError, EmbedServeError) as e:
        logger.error("%s", e)
        return 1
