"""Use cases of embedding: embed a batch of images through the batcher, optionally store it durably.

    embedding = Embedding(index, threads=IndexThreads(), max_images=256, metrics=metrics)
    embedding.attach(batcher, engine.info)           # until then, embedding is EngineUnavailableError
    results = await embedding.embed(EmbedBatch(images=[ImageData("scan-1", jpeg)], store=True), timeout=5.0)

`IndexThreads` runs the blocking index calls off the event loop, for this module and `service.app.neighbors`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from service.errors import EngineUnavailableError, InvalidRequestError
from service.index.store import DEFAULT_COLLECTION, IndexStore, check_collection_name
from service.metrics import Metrics
from service.types import CollectionInfo, EmbedBatch, EmbedOutcome, ImageData, ModelInfo

T = TypeVar("T")

INDEX_THREADS = 8
"""Threads for index calls; concurrent stores wait on one shared fsync (group commit) in them."""


class ImageEmbedder(Protocol):
    """What embedding needs of `service.embedding.batcher.Batcher`."""

    async def embed(
        self, datas: Sequence[bytes], *, timeout: float | None = None, wait: bool = False
    ) -> list[EmbedOutcome]: ...


class IndexThreads:
    """A thread pool for blocking index calls, awaited from the event loop."""

    def __init__(self, max_workers: int = INDEX_THREADS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="embedserve-index")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in one of the threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Wait for the running calls, then stop the threads."""
        self._pool.shutdown(wait=True)


class Embedding:
    """Embeds images with every other caller's (through the batcher) and stores them in the index."""

    def __init__(self, index: IndexStore, *, threads: IndexThreads, max_images: int, metrics: Metrics) -> None:
        self.index = index
        self.threads = threads
        self.max_images = max_images
        """The most images (or queries) one request may carry."""
        self.metrics = metrics
        self._batcher: ImageEmbedder | None = None
        self.info: ModelInfo | None = None
        """What the engine runs; None while the model is loading."""

    def attach(self, batcher: ImageEmbedder, info: ModelInfo) -> None:
        """Start embedding through `batcher` (a `service.embedding.batcher.Batcher`) for the model `info` describes."""
        self._batcher = batcher
        self.info = info

    def model_info(self) -> ModelInfo:
        """What the engine runs (EngineUnavailableError while it loads)."""
        if self.info is None:
            raise EngineUnavailableError("the model is still loading; retry shortly")
        return self.info

    def validate(self, batch: EmbedBatch) -> None:
        """Refuse a batch over the size limit, or one to store without a key on every image (InvalidRequestError)."""
        n = len(batch.images)
        if n > self.max_images:
            raise InvalidRequestError(
                f"{n} images in one request; this server takes at most {self.max_images} "
                "(server.max_images_per_request, batcher.max_queue_size): split the request"
            )
        if batch.store:
            check_collection_name(batch.collection or DEFAULT_COLLECTION)
            if any(not image.key for image in batch.images):
                raise InvalidRequestError("store=true needs a non-empty key on every image")

    async def embed_images(
        self, datas: Sequence[bytes], *, timeout: float | None, wait: bool = False
    ) -> list[EmbedOutcome]:
        """One outcome per encoded image, in order (see `Batcher.embed` for `timeout` and `wait`)."""
        if self._batcher is None or self.info is None:
            raise EngineUnavailableError("the model is still loading; retry shortly")
        return await self._batcher.embed(list(datas), timeout=timeout, wait=wait)

    async def embed(self, batch: EmbedBatch, *, timeout: float | None, wait: bool = False) -> list[EmbedOutcome]:
        """Embed (and with `batch.store`, durably store) a validated batch; one outcome per image, in order.

        With `wait` a full queue is waited on (streams) instead of refused with OverloadedError.
        """
        outcomes = await self.embed_images([image.data for image in batch.images], timeout=timeout, wait=wait)
        if batch.store:
            await self.store(batch.collection or DEFAULT_COLLECTION, batch.images, outcomes)
        return outcomes

    async def store(self, collection: str, images: Sequence[ImageData], outcomes: Sequence[EmbedOutcome]) -> None:
        """Upsert the embedded images into `collection` (created at the model's dim if missing); durable on return."""
        done = [
            (image, outcome.vector)
            for image, outcome in zip(images, outcomes, strict=True)
            if outcome.vector is not None
        ]
        if not done:
            return
        if not self.index.has_collection(collection):
            await self.threads.run(
                self.index.create_collection, collection, dim=self.model_info().embedding_dim, exist_ok=True
            )
        started = time.perf_counter()
        await self.threads.run(
            self.index.upsert,
            collection,
            [image.key for image, _ in done],
            np.stack([vector for _, vector in done]),
            [dict(image.attributes) for image, _ in done],
        )
        self.metrics.stage_duration.labels(stage="index").observe(time.perf_counter() - started)

    async def create_collection(
        self, name: str, *, dim: int = 0, metric: str = "", index_type: str = ""
    ) -> CollectionInfo:
        """Create a collection; `dim=0` takes the model's (EngineUnavailableError while it loads)."""
        if dim == 0:
            if self.info is None:
                raise EngineUnavailableError("the model is still loading; pass dim or retry shortly")
            dim = self.info.embedding_dim
        info: CollectionInfo = await self.threads.run(
            self.index.create_collection, name, dim=dim, metric=metric or None, index_type=index_type or None
        )
        return info
