"""The pixel budget with the real engine: batches of real OCT scans are cut by their decoded size, and the vectors
are those of the offline engine."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from service.config import BatcherConfig
from service.embedding.batcher import Batcher
from service.embedding.engine import Engine, PreparedBatch
from service.errors import ImageError
from service.types import EmbedOutcome


class RecordingEngine:
    """The real engine, recording the images of every `prepare`."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.prepared: list[list[bytes]] = []
        self.lock = threading.Lock()

    def pixels(self, data: bytes) -> int:
        return self.inner.pixels(data)

    def release_memory(self) -> None:
        self.inner.release_memory()

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        with self.lock:
            self.prepared.append([d for d in datas if isinstance(d, bytes)])
        return self.inner.prepare(datas)

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        return self.inner.run(prepared)


def decoded_pixels(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert("RGB"))
    return array.shape[0] * array.shape[1]


def test_real_scans_are_batched_within_the_pixel_budget(
    engine: Engine, oct_images: list[tuple[str, bytes]], reference: dict[str, np.ndarray]
) -> None:
    images = oct_images[:12]
    sizes = [decoded_pixels(data) for _, data in images]
    assert [engine.pixels(data) for _, data in images] == sizes  # the header reader against a real decode
    budget = 3 * max(sizes)
    spy = RecordingEngine(engine)
    cfg = BatcherConfig(max_batch_size=8, max_queue_delay_ms=200, max_queue_size=64, max_batch_pixels=budget)

    async def main() -> list[EmbedOutcome]:
        batcher = Batcher(spy, cfg)
        await batcher.start()
        try:
            return await batcher.embed([data for _, data in images])
        finally:
            await batcher.close()

    outcomes = asyncio.run(main())
    batches = [[decoded_pixels(d) for d in batch] for batch in spy.prepared]
    assert sum(len(b) for b in batches) == len(images)
    assert all(sum(b) <= budget for b in batches), batches
    assert len(batches) >= len(images) // 3  # the budget, not max_batch_size (8), cut these batches
    for (key, _), outcome in zip(images, outcomes, strict=True):
        assert outcome.vector is not None
        assert float(np.dot(outcome.vector, reference[key])) > 0.9999
