"""Memory under load: the per-batch pixel budget, out-of-memory split and retry, trimming the heap after bursts.

The fake engine decodes real encoded images with Pillow and records how many pixels each batch really decoded, so
the budget is checked against decoded sizes, not against the header reader it relies on.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.config import DEFAULT_FORMATS, BatcherConfig
from service.embedding import batcher as batcher_module
from service.embedding.batcher import Batcher
from service.embedding.engine import PreparedBatch, header_pixels
from service.embedding.faults import is_fatal, is_out_of_memory
from service.embedding.memory import malloc_trim, rss_bytes, trim_available
from service.errors import ImageError, ImageTooLargeError, InvalidImageError
from service.types import EmbedOutcome

BAD = Path(__file__).resolve().parents[2] / "data" / "bad"
MAX_PIXELS = 50_000_000


def encode(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


class PillowEngine:
    """Decodes for real; each image's 'embedding' is [width, height]. Can run out of memory on purpose.

    `prepare_limit`: `prepare` raises MemoryError after decoding more pixels than this in one call (an allocator
    that has that much); `run_limit`: `run` raises torch's OutOfMemoryError for more rows than this.
    `always_oom`: prepare raises for any call holding an image this wide, even alone.
    """

    def __init__(
        self, prepare_limit: int | None = None, run_limit: int | None = None, always_oom: int | None = None
    ) -> None:
        self.prepare_limit = prepare_limit
        self.run_limit = run_limit
        self.always_oom = always_oom
        self.prepared_pixels: list[int] = []
        """Pixels each successful `prepare` decoded."""
        self.run_rows: list[int] = []
        """Rows of each successful `run`."""
        self.released = 0
        self.lock = threading.Lock()

    def pixels(self, data: bytes) -> int:
        return header_pixels(data, MAX_PIXELS, DEFAULT_FORMATS)

    def release_memory(self) -> None:
        with self.lock:
            self.released += 1

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        rows: list[list[float]] = []
        positions: list[int] = []
        errors: dict[int, ImageError] = {}
        decoded = 0
        for i, data in enumerate(datas):
            if isinstance(data, ImageError):
                errors[i] = data
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    array = np.asarray(im.convert("RGB"))
            except OSError:
                errors[i] = InvalidImageError("not an image")
                continue
            height, width = array.shape[:2]
            decoded += height * width
            if self.always_oom is not None and width == self.always_oom:
                raise MemoryError()
            rows.append([float(width), float(height)])
            positions.append(i)
        if self.prepare_limit is not None and decoded > self.prepare_limit:
            raise MemoryError()
        with self.lock:
            self.prepared_pixels.append(decoded)
        batch = np.array(rows, dtype=np.float32) if rows else None
        return PreparedBatch(size=len(datas), batch=batch, ok_positions=positions, errors=errors)  # type: ignore[arg-type]

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        rows = len(prepared.ok_positions)
        if self.run_limit is not None and rows > self.run_limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        with self.lock:
            self.run_rows.append(rows)
        outcomes = [EmbedOutcome() for _ in range(prepared.size)]
        for i, error in prepared.errors.items():
            outcomes[i].error = error
        if prepared.batch is not None:
            for row, i in enumerate(prepared.ok_positions):
                outcomes[i].vector = np.asarray(prepared.batch[row])
        return outcomes


def serve(engine: PillowEngine, cfg: BatcherConfig, *requests: list[bytes]) -> tuple[list[object], Batcher]:
    """Send the requests one after the other through a started batcher; their results (or exceptions)."""

    async def main() -> tuple[list[object], Batcher]:
        b = Batcher(engine, cfg, on_failure=failures.append)
        await b.start()
        results: list[object] = []
        try:
            for request in requests:
                try:
                    results.append(await b.embed(request))
                except Exception as e:
                    results.append(e)
            await asyncio.sleep(0.05)  # a trim runs after the last batch, on a worker
        finally:
            await b.close()
        return results, b

    failures: list[BaseException] = []
    out = asyncio.run(main())
    assert failures == []
    return out


def sizes(result: object) -> list[tuple[int, int]]:
    assert isinstance(result, list)
    return [(int(o.vector[0]), int(o.vector[1])) for o in result]


def cfg(**kw: float) -> BatcherConfig:
    defaults: dict[str, float] = {"max_batch_size": 8, "max_queue_delay_ms": 50, "max_queue_size": 64}
    defaults.update(kw)
    return BatcherConfig(**defaults)  # type: ignore[arg-type]


# -- the pixel budget --------------------------------------------------------------------------------------------

SHAPES = [(100, 100), (200, 100), (50, 50), (300, 200), (100, 100), (90, 100), (100, 110)]


def test_a_batch_is_cut_before_the_image_that_would_exceed_the_budget() -> None:
    engine = PillowEngine()
    request = [encode(w, h, seed=i) for i, (w, h) in enumerate(SHAPES)]
    (result,), _ = serve(engine, cfg(max_batch_pixels=40_000), request)
    assert sizes(result) == SHAPES
    # 10000 + 20000 + 2500; then 60000 alone (larger than the budget); then 10000 + 9000 + 11000.
    assert sorted(engine.prepared_pixels) == [30_000, 32_500, 60_000]  # two decode workers: any order
    assert engine.run_rows == [3, 1, 3]  # the runner keeps the order


class SlowPillowEngine(PillowEngine):
    """Runs slowly and tracks the decoded pixels alive: from the start of their `prepare` to the end of their `run`."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = 0
        self.peak_alive = 0

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        pixels = sum(self.pixels(d) for d in datas if isinstance(d, bytes))
        with self.lock:
            self.alive += pixels
            self.peak_alive = max(self.peak_alive, self.alive)
        return super().prepare(datas)

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        time.sleep(0.1)
        outcomes = super().run(prepared)
        pixels = sum(int(o.vector[0]) * int(o.vector[1]) for o in outcomes if o.vector is not None)
        with self.lock:
            self.alive -= pixels
        return outcomes


@pytest.mark.parametrize(("budget", "bounded"), [(40_000, True), (0, False)])
def test_decoded_pixels_in_flight_stay_within_the_budget(budget: int, bounded: bool) -> None:
    engine = SlowPillowEngine()
    shapes = [(200, 100 + i) for i in range(8)]  # about 20000 pixels each: two per batch under the budget
    (result,), b = serve(engine, cfg(max_batch_size=2, max_batch_pixels=budget), [encode(w, h) for w, h in shapes])
    assert sizes(result) == shapes
    if bounded:
        assert engine.peak_alive <= budget and b.peak_inflight_pixels <= budget
    else:  # the reference: without the budget, decoding runs ahead of the slow forward passes
        assert engine.peak_alive > 40_000


def test_without_a_budget_the_batch_size_alone_cuts() -> None:
    engine = PillowEngine()
    request = [encode(w, h, seed=i) for i, (w, h) in enumerate(SHAPES)]
    (result,), _ = serve(engine, cfg(max_batch_pixels=0), request)
    assert sizes(result) == SHAPES
    assert engine.run_rows == [7]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP"])
def test_header_pixels_equal_the_decoded_size(fmt: str) -> None:
    for width, height in [(1, 1), (37, 23), (640, 480)]:
        data = encode(width, height, fmt)
        with Image.open(io.BytesIO(data)) as im:
            decoded = np.asarray(im.convert("RGB")).shape
        assert header_pixels(data, MAX_PIXELS, DEFAULT_FORMATS) == decoded[0] * decoded[1] == width * height


def test_header_pixels_of_bad_images_are_bounded_and_never_raise() -> None:
    files = sorted(p for p in BAD.iterdir() if p.suffix not in (".py", ".csv"))
    assert len(files) > 40
    for path in files:
        pixels = header_pixels(path.read_bytes(), MAX_PIXELS, DEFAULT_FORMATS)
        assert 0 <= pixels <= MAX_PIXELS, path.name
    # Bombs announce more than decode.max_pixels: they are refused before decoding, so they cost nothing.
    for name in ("bomb-png-header-200000x200000.png", "bomb-jpeg-sof-65000x65000.jpg", "odd-gif.gif", "empty.jpg"):
        assert header_pixels((BAD / name).read_bytes(), MAX_PIXELS, DEFAULT_FORMATS) == 0, name


# -- out of memory: split and retry ------------------------------------------------------------------------------


def test_out_of_memory_in_prepare_splits_the_batch_until_it_fits() -> None:
    engine = PillowEngine(prepare_limit=25_000)
    shapes = [(100 + i, 100) for i in range(6)]  # about 10000 pixels each: 60000 in one batch
    request = [encode(w, h, seed=i) for i, (w, h) in enumerate(shapes)]
    (result, after), b = serve(engine, cfg(max_batch_pixels=0), request, [encode(10, 10)])
    assert sizes(result) == shapes and sizes(after) == [(10, 10)]
    assert all(p <= 25_000 for p in engine.prepared_pixels)
    assert sum(engine.prepared_pixels) == sum(w * h for w, h in shapes) + 100  # every image decoded once in the end
    assert b.oom_splits >= 3 and engine.released == b.oom_splits
    assert b.running is False  # closed; but it never failed:
    assert b.failure is None and b.consecutive_failed_batches == 0


def test_torch_out_of_memory_in_run_runs_smaller_batches() -> None:
    engine = PillowEngine(run_limit=2)
    shapes = [(20 + i, 10) for i in range(5)]
    request = [encode(w, h, seed=i) for i, (w, h) in enumerate(shapes)]
    request.insert(2, b"not an image")
    (result,), b = serve(engine, cfg(), request)
    assert isinstance(result, list)
    assert isinstance(result[2].error, InvalidImageError)
    assert sizes([o for o in result if o.error is None]) == shapes  # in order, around the bad one
    assert engine.run_rows and max(engine.run_rows) <= 2 and sum(engine.run_rows) == 5
    assert b.oom_splits >= 2 and b.failure is None


def test_an_image_that_runs_out_of_memory_alone_fails_alone_and_the_server_goes_on() -> None:
    engine = PillowEngine(always_oom=77)
    request = [encode(30, 30), encode(77, 40), encode(31, 30)]
    (result, after), b = serve(engine, cfg(), request, [encode(32, 30)])
    assert isinstance(result, list)
    assert isinstance(result[1].error, ImageTooLargeError) and result[1].error.reason == "image_too_large"
    assert [(int(o.vector[0]), int(o.vector[1])) for o in (result[0], result[2])] == [(30, 30), (31, 30)]
    assert sizes(after) == [(32, 30)]
    assert b.failure is None and b.consecutive_failed_batches == 0


def test_out_of_memory_is_recognised_from_real_allocators() -> None:
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50, dtype=torch.uint8)  # torch's DefaultCPUAllocator refuses a petabyte
    assert is_out_of_memory(cpu.value) and not is_fatal(cpu.value)
    with pytest.raises(MemoryError) as py:
        bytearray(2**50)
    assert is_out_of_memory(py.value)
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert is_out_of_memory(cuda) and not is_fatal(cuda)
    wrapped = RuntimeError("prepare failed")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)
    for other in (RuntimeError("CUDA error: an illegal memory access was encountered"), TypeError("float")):
        assert not is_out_of_memory(other)


# -- returning memory after bursts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("after", "interval", "expected"), [(1, 0.0, 3), (1, 3600.0, 1), (0, 0.0, 0)])
def test_the_heap_is_trimmed_after_bursts_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch, after: int, interval: float, expected: int
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(batcher_module, "malloc_trim", lambda: calls.append(1) or True)
    requests = [[encode(10, 10, seed=i)] for i in range(3)]
    _, b = serve(PillowEngine(), cfg(trim_after_pixels=after, trim_interval_s=interval), *requests)
    assert len(calls) == expected == b.trims


def test_trim_is_not_run_below_the_pixel_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(batcher_module, "malloc_trim", lambda: calls.append(1) or True)
    requests = [[encode(10, 10, seed=i)] for i in range(3)]  # 300 pixels in all
    serve(PillowEngine(), cfg(trim_after_pixels=250, trim_interval_s=0), *requests)
    assert len(calls) == 1  # once the third image took the count past 250


@pytest.mark.skipif(not trim_available(), reason="malloc_trim needs glibc (Linux CI has it)")
def test_malloc_trim_returns_freed_memory() -> None:
    chunks = [bytearray(b"x" * (64 * 1024)) for _ in range(4000)]  # 250 MB of heap (below the mmap threshold)
    pin = bytearray(b"x" * (64 * 1024))  # above them: free() cannot shrink the heap past a live block
    del chunks
    held = rss_bytes()  # freed, but still resident
    assert malloc_trim()
    assert rss_bytes() < held - 100 * 2**20
    del pin


def test_memory_settings_are_validated() -> None:
    for field in ("max_batch_pixels", "trim_after_pixels", "trim_interval_s"):
        with pytest.raises(ValueError, match=field):
            BatcherConfig(**{field: -1})  # type: ignore[arg-type]
    assert BatcherConfig(max_batch_pixels=0, trim_after_pixels=0).max_batch_pixels == 0
