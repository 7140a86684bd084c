"""`RemoteEmbedder`: the engine's job interface (`info`, `embed_iter`) backed by a server's `EmbedStream`."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from service.client import calls
from service.client.channel import DEFAULT_MAX_MESSAGE_BYTES, RemoteError, WaitNotice, remote_error
from service.client.sync import EmbedClient
from service.errors import ImageError
from service.types import EmbedBatch, Embedded, EmbedOutcome, ImageData, ModelInfo, VectorDType, load_item
from service.wire import convert
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb

logger = logging.getLogger(__name__)


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


RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
"""A stream that ends with one of these (the server drained, was killed, or restarts) is resumed after a wait."""

MAX_FRUITLESS_RESUMES = 5
"""Resumed streams in a row that end before any answer: after this many the server is taken to be broken."""


class RemoteEmbedder:
    """The engine's job interface (`info`, `embed_iter`) backed by a server's `EmbedStream`.

    Items are loaded on gRPC's request thread, `batch_size` per request, and at most `max_in_flight` requests are
    unanswered at a time, so memory stays bounded however long the input is. With `store`, the server also upserts
    the vectors into `collection`, with each item's `label` and `path` (when it has them) as attributes, and answers
    each request only once it is durable.

    Waiting and resuming: the server is first awaited (SERVING) for up to `wait` seconds. When the stream ends with
    UNAVAILABLE (the server drains on SIGTERM, is killed, or restarts), the server is awaited again for up to `wait`
    seconds, with backoff and jitter, and the requests it had not answered are sent again on a new stream, in order,
    then the rest. Stores are upserts by key, so an item is stored once however often it is sent. `on_wait(reason)`
    is called once at the start of each wait. `wait=0` fails at once instead (`RemoteError`).
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
        wait: float = 0.0,
        on_wait: WaitNotice | None = None,
    ) -> None:
        if batch_size <= 0 or max_in_flight <= 0:
            raise ValueError(f"batch_size={batch_size} and max_in_flight={max_in_flight} must be positive")
        if wait < 0:
            raise ValueError(f"wait={wait} must be >= 0 seconds")
        self.client = EmbedClient(
            target, token=token, tls=tls, root_certificates=root_certificates, max_message_bytes=max_message_bytes
        )
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.dtype = dtype
        self.store = store
        self.collection = collection
        self.wait = wait
        self.on_wait = on_wait
        self.resumed = 0
        """How many times a stream was resumed on a new one after the server went away."""
        self._answered = 0
        if wait > 0:
            self.client.wait_until_serving(wait, on_wait=on_wait)
        self.info: ModelInfo = self.client.model_info()

    def _request(self, chunk: _Chunk) -> pb.EmbedStreamRequest:
        images = [
            ImageData(item.key, data, _attributes(item) if self.store else {})
            for item, data in zip(chunk.items, chunk.loaded, strict=True)
            if not isinstance(data, ImageError)
        ]
        batch = EmbedBatch(images=images, dtype=self.dtype, store=self.store, collection=self.collection)
        return convert.embed_batch_to_stream_proto(batch)

    def embed_iter(self, items: Iterable[ItemT]) -> Iterator[Embedded[ItemT]]:
        """Yield every item with its outcome, in input order (unreadable items carry their load error)."""
        iterator = iter(items)
        unanswered: deque[_Chunk] = deque()
        fruitless = 0
        while True:
            answered = self._answered
            try:
                yield from self._stream(iterator, unanswered)
                return
            except RemoteError as e:
                fruitless = fruitless + 1 if self._answered == answered else 1
                if e.code not in RESUMABLE or self.wait <= 0 or fruitless > MAX_FRUITLESS_RESUMES:
                    raise
                logger.info("the stream to the server ended (%s); waiting up to %.0f s to resume", e, self.wait)
                self._reconnect(e)

    def _reconnect(self, error: RemoteError) -> None:
        """Wait for the server to serve again (same model), or raise `RemoteError` (UNAVAILABLE)."""
        self.client.wait_until_serving(self.wait, on_wait=self.on_wait)
        info = self.client.model_info()
        if (info.backbone, info.embedding_dim) != (self.info.backbone, self.info.embedding_dim):
            raise RemoteError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server came back with {info.backbone} ({info.embedding_dim}-d), not {self.info.backbone} "
                f"({self.info.embedding_dim}-d); the job cannot resume on another model",
            ) from error
        self.resumed += 1

    def _stream(self, iterator: Iterator[ItemT], unanswered: deque[_Chunk]) -> Iterator[Embedded[ItemT]]:
        """One EmbedStream: first the chunks of `unanswered` again (a resumed stream), then new ones."""
        slots = threading.Semaphore(self.max_in_flight)
        stop = threading.Event()
        resend = list(unanswered)

        def requests() -> Iterator[pb.EmbedStreamRequest]:
            for chunk in resend:
                slots.acquire()
                if stop.is_set():
                    return
                yield self._request(chunk)
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                items = list(itertools.islice(iterator, self.batch_size))
                if not items:
                    return
                chunk = _Chunk(items=items, loaded=[load_item(item) for item in items])
                unanswered.append(chunk)
                yield self._request(chunk)

        call = self.client.stub.EmbedStream(requests(), metadata=self.client.metadata)
        try:
            for response in call:
                self._answered += 1
                chunk = unanswered.popleft()
                slots.release()
                results = iter(calls.parse_embed(response))
                for item, data in zip(chunk.items, chunk.loaded, strict=True):
                    if isinstance(data, ImageError):
                        outcome = EmbedOutcome(error=data)
                    else:
                        result = next(results)
                        outcome = EmbedOutcome(vector=result.vector, error=result.error)
                    yield Embedded(item, outcome)
        except grpc.RpcError as e:
            raise remote_error(e) from e
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
    """`label`, `path` and the extra `attributes` of a job item (a `FileItem`), when it has them, to store."""
    attributes: dict[str, str] = {}
    label = getattr(item, "label", None)
    if label is not None:
        attributes["label"] = str(label)
    path = getattr(item, "path", None)
    if path is not None:
        attributes["path"] = str(path)
    extra = getattr(item, "attributes", None)  # `--attr` / `--attributes` of `embedserve embed --store`
    if extra:
        attributes.update({str(k): str(v) for k, v in extra.items()})
    return attributes
