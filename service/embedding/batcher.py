"""Dynamic batching shared by every request of the server.

Images of many small concurrent requests run together through one forward pass:

    embed() ──► queue ──► collector ──► decode pool ──► ready (bounded) ──► runner ──► owner thread
    (admission:          (one deadline     (engine.prepare,  (backpressure)   (drops cancelled   (engine.run)
     max_queue_size)      per batch)        off the loop)                       and expired)

- Admission: a request whose images do not fit in `max_queue_size` is refused at once with `OverloadedError`
  (or, with `wait=True`, waits for room: streams use that for flow control). Nothing grows without bound.
- The collector closes a batch at `max_batch_size` images, at `max_batch_pixels` decoded pixels (each image's
  header says how many, through the engine's `pixels`; the image that would exceed the budget opens the next
  batch, and one larger than the budget runs alone) or at first arrival + `max_queue_delay_ms`; it drops items
  whose future is already done (cancelled call, expired deadline), and hands the batch to the decode pool.
  Decoding of the next batch overlaps the forward pass of the current one, within the same budget: a batch is
  decoded only while the batches decoding, ready and running hold, with it, at most `max_batch_pixels` (or when
  none is in flight), so decoded pixels in flight never exceed the budget but for one oversized image.
- The runner is the only caller of `engine.run`, on a single owner thread; before running it drops items
  cancelled or expired while they were decoded, so their images never reach the model.
- Failure policy: one image's bad bytes are that image's error (decode never raises for them). An unexpected
  exception while a batch is prepared or run fails that batch's futures with `BatchFailedError` (INTERNAL at the
  edge, the cause only in the log) and the batcher goes on. Only a fatal condition stops it: an error that
  `service.embedding.faults.is_fatal` recognises (a CUDA error that poisons the context), or
  `max_consecutive_failed_batches` failed batches in a row. Then, as when a background task dies, every pending
  future fails with `EngineUnavailableError` and `on_failure` is called (the server flips health to NOT_SERVING).
- Out of memory (`faults.is_out_of_memory`: `MemoryError`, torch's OOM, a CPU allocator's refusal) while a batch
  is prepared or run is not a failure: the engine releases what it caches, the batch is split in halves and each
  half is tried again; an image that runs out of memory alone fails as `image_too_large`. The server keeps serving.
- Memory after bursts: once `trim_after_pixels` pixels have been decoded and the queue is empty, glibc's free
  heap pages go back to the OS (`malloc_trim`, at most once per `trim_interval_s`, on a decode worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from service.config import BatcherConfig
from service.embedding.engine import PreparedBatch
from service.embedding.faults import is_fatal, is_out_of_memory
from service.embedding.memory import malloc_trim, rss_bytes
from service.errors import (  # noqa: F401  (re-exported: callers import these from the batcher too)
    BatchFailedError,
    DeadlineExpiredError,
    EmbedServeError,
    EngineUnavailableError,
    ImageError,
    ImageTooLargeError,
    OverloadedError,
)
from service.metrics import Metrics, image_outcome
from service.types import EmbedOutcome

logger = logging.getLogger(__name__)


class BatchEngine(Protocol):
    """The part of `service.embedding.engine.Engine` the batcher uses."""

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch: ...

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]: ...


class MemoryAwareEngine(BatchEngine, Protocol):
    """Optional extras of an engine that the batcher uses when present (`service.embedding.engine.Engine` has both)."""

    def pixels(self, data: bytes) -> int:
        """Pixels `data` decodes to, read from its header (0 when it will fail before decoding)."""
        ...

    def release_memory(self) -> None:
        """Give back cached memory (device caches, the C heap) after running out of it."""
        ...


@dataclass(slots=True)
class Pending:
    """One image waiting for its forward pass."""

    data: bytes
    future: asyncio.Future[EmbedOutcome]
    enqueued_at: float
    """`time.monotonic()` at admission."""
    deadline: float | None
    """`time.monotonic()` after which the image is dropped; None for no deadline."""
    pixels: int = 0
    """Decoded pixels the image's header announces (what counts against `max_batch_pixels`)."""


@dataclass(slots=True)
class _Batch:
    """A closed batch, decoding in the pool or decoded."""

    items: list[Pending]
    prepared: asyncio.Future[list[PreparedBatch]]
    """The prepared batch: one part, or several (consecutive slices of `items`) when preparing it ran out of memory."""
    pixels: int


def select(prepared: PreparedBatch, keep: Sequence[int]) -> PreparedBatch:
    """The sub-batch of input positions `keep` (sorted), renumbered 0..len(keep)-1."""
    if len(keep) == prepared.size:
        return prepared
    new_position = {old: new for new, old in enumerate(keep)}
    rows = [row for row, pos in enumerate(prepared.ok_positions) if pos in new_position]
    batch = prepared.batch[rows] if prepared.batch is not None and rows else None
    return PreparedBatch(
        size=len(keep),
        batch=batch,
        ok_positions=[new_position[prepared.ok_positions[row]] for row in rows],
        errors={new_position[pos]: err for pos, err in prepared.errors.items() if pos in new_position},
    )


def _out_of_memory_error() -> ImageTooLargeError:
    return ImageTooLargeError(
        "the server ran out of memory decoding or embedding this image alone; retry later or send it smaller"
    )


class Batcher:
    """Collects images from concurrent requests into batches for one engine. `await start()`, then `embed()`."""

    def __init__(
        self,
        engine: BatchEngine,
        cfg: BatcherConfig,
        *,
        metrics: Metrics | None = None,
        decode_workers: int = 2,
        prefetch_batches: int = 1,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics
        self.on_failure = on_failure
        self._delay = cfg.max_queue_delay_ms / 1000.0
        self._queue: deque[Pending] = deque()
        self._queued = 0
        self.peak_queued = 0
        """Most images ever admitted and not yet running (never above `max_queue_size`)."""
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._ready: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=prefetch_batches)
        self._futures: set[asyncio.Future[EmbedOutcome]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._decode_pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="embedserve-batch-decode")
        self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedserve-forward")
        self._closing = False
        self.failure: BaseException | None = None
        """Why the batcher stopped working, once it has."""
        self.consecutive_failed_batches = 0
        """Batches in a row that failed unexpectedly; reset by every batch that runs."""
        self._pixels = getattr(engine, "pixels", None)
        self._release = getattr(engine, "release_memory", None)
        self.oom_splits = 0
        """Times a batch (or part of one) ran out of memory and was split."""
        self.trims = 0
        """Times freed heap memory was returned to the OS."""
        self._pixels_since_trim = 0
        self._inflight_pixels = 0
        """Decoded pixels of the batches handed to the decode pool and not yet finished."""
        self.peak_inflight_pixels = 0
        """Most decoded pixels ever in flight (the budget bounds it, but for one image larger than the budget)."""
        self._pixels_freed = asyncio.Event()
        self._last_trim = -float("inf")
        self._trim_task: asyncio.Future[None] | None = None

    @property
    def queued(self) -> int:
        """Images admitted and not yet in a forward pass."""
        return self._queued

    @property
    def running(self) -> bool:
        return bool(self._tasks) and self.failure is None and not self._closing

    async def start(self) -> None:
        """Start the collector and runner tasks on the running loop."""
        if self._tasks:
            return
        for coro, name in ((self._collect_loop(), "collector"), (self._run_loop(), "runner")):
            task = asyncio.create_task(coro, name=f"embedserve-batcher-{name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)

    async def embed(
        self, datas: Sequence[bytes], *, timeout: float | None = None, wait: bool = False
    ) -> list[EmbedOutcome]:
        """Embed encoded images with every other request's; one outcome per image, in order.

        Raises `OverloadedError` when they do not fit in the queue (with `wait`, waits for room instead, up to
        `timeout`), `DeadlineExpiredError` after `timeout` seconds, `EngineUnavailableError` when not running.
        Cancelling the caller drops its images that have not run yet.
        """
        if not datas:
            return []
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        n = len(datas)
        self._check_running()
        if n > self.cfg.max_queue_size:
            self._count("rejected", n)
            raise OverloadedError(
                f"a request of {n} images can never fit the queue of {self.cfg.max_queue_size}; send smaller requests"
            )
        while self._queued + n > self.cfg.max_queue_size:
            if not wait:
                self._count("rejected", n)
                raise OverloadedError(
                    f"server busy: {self._queued} images queued (limit {self.cfg.max_queue_size}); retry with backoff"
                )
            room = self._room
            try:
                await asyncio.wait_for(room.wait(), None if deadline is None else max(0.0, deadline - time.monotonic()))
            except TimeoutError as e:
                self._count("deadline_exceeded", n)
                raise DeadlineExpiredError("the deadline passed while waiting for room in the queue") from e
            self._check_running()

        loop = asyncio.get_running_loop()
        now = time.monotonic()
        costs = [self._pixels(d) for d in datas] if self._pixels is not None else [0] * n
        items = [
            Pending(data=d, future=loop.create_future(), enqueued_at=now, deadline=deadline, pixels=c)
            for d, c in zip(datas, costs, strict=True)
        ]
        for p in items:
            self._futures.add(p.future)
            p.future.add_done_callback(self._futures.discard)
        self._queue.extend(items)
        self._set_queued(self._queued + n)
        self._arrived.set()

        futures = [p.future for p in items]
        try:
            done, _ = await asyncio.wait(futures, timeout=None if deadline is None else max(0.0, deadline - now))
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        if len(done) < n:
            for f in futures:
                f.cancel()
            _ = [f.exception() for f in done if not f.cancelled()]  # retrieved: the deadline is what we report
            raise DeadlineExpiredError(f"the deadline passed before {n - len(done)} of {n} images were embedded")
        errors = [error for f in futures if (error := f.exception()) is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    async def close(self) -> None:
        """Stop the tasks and fail whatever is still pending (call after the server has drained its calls)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_all(EngineUnavailableError("the server is shutting down"))
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._owner.shutdown(wait=False, cancel_futures=True)

    # -- the pipeline --------------------------------------------------------------------------------------------

    async def _collect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_item(None)
            if first is None:  # only with a close time; kept for the type checker
                continue
            batch = [first]
            pixels = first.pixels
            budget = self.cfg.max_batch_pixels
            close_at = first.enqueued_at + self._delay
            while len(batch) < self.cfg.max_batch_size and not (budget and pixels >= budget):
                item = await self._next_item(close_at)
                if item is None:
                    break
                if budget and pixels + item.pixels > budget:
                    self._queue.appendleft(item)  # it opens the next batch
                    break
                batch.append(item)
                pixels += item.pixels
            await self._wait_for_pixels(pixels)
            batch = [batch[i] for i in self._live_positions(batch)]
            if not batch:
                continue
            pixels = sum(p.pixels for p in batch)
            self._inflight_pixels += pixels
            self.peak_inflight_pixels = max(self.peak_inflight_pixels, self._inflight_pixels)
            prepared = loop.run_in_executor(self._decode_pool, self._prepare, [p.data for p in batch])
            await self._ready.put(_Batch(items=batch, prepared=prepared, pixels=pixels))

    async def _wait_for_pixels(self, pixels: int) -> None:
        """Wait until a batch of `pixels` fits the budget beside the batches in flight (at once when none is)."""
        budget = self.cfg.max_batch_pixels
        while budget and self._inflight_pixels and self._inflight_pixels + pixels > budget:
            self._pixels_freed.clear()
            await self._pixels_freed.wait()

    async def _next_item(self, close_at: float | None) -> Pending | None:
        """The next live queued item; None once `close_at` (monotonic) has passed. Drops done items."""
        while True:
            while self._queue:
                item = self._queue.popleft()
                if not item.future.done():
                    return item
                self._set_queued(self._queued - 1)
                self._count(_dropped_outcome(item, time.monotonic()), 1)
            self._arrived.clear()
            if close_at is None:
                await self._arrived.wait()
                continue
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return None

    def _prepare(self, datas: list[bytes]) -> list[PreparedBatch]:
        start = time.monotonic()
        parts = self._prepare_parts(datas)
        if self.metrics is not None:
            self.metrics.stage_duration.labels(stage="decode").observe(time.monotonic() - start)
        return parts

    def _prepare_parts(self, datas: list[bytes]) -> list[PreparedBatch]:
        """`engine.prepare(datas)` as one part; out of memory, the two halves' parts (recursively)."""
        try:
            return [self.engine.prepare(datas)]
        except Exception as error:
            if is_fatal(error) or not is_out_of_memory(error):
                raise
            self._out_of_memory("prepare", len(datas), error)
        self._release_memory()  # outside the except block: the traceback no longer holds the failed frames
        if len(datas) == 1:
            return [PreparedBatch(size=1, batch=None, ok_positions=[], errors={0: _out_of_memory_error()})]
        half = (len(datas) + 1) // 2
        return self._prepare_parts(datas[:half]) + self._prepare_parts(datas[half:])

    def _run_parts(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        """`engine.run(prepared)`; out of memory, the two halves run apart (recursively), in order."""
        try:
            return self.engine.run(prepared)
        except Exception as error:
            if is_fatal(error) or not is_out_of_memory(error):
                raise
            self._out_of_memory("run", len(prepared.ok_positions), error)
        self._release_memory()
        rows = len(prepared.ok_positions)
        if rows <= 1:
            outcomes = [EmbedOutcome() for _ in range(prepared.size)]
            for i, image_error in prepared.errors.items():
                outcomes[i].error = image_error
            for i in prepared.ok_positions:
                outcomes[i].error = _out_of_memory_error()
            return outcomes
        middle = prepared.ok_positions[rows // 2]
        first = self._run_parts(select(prepared, range(middle)))
        return first + self._run_parts(select(prepared, range(middle, prepared.size)))

    def _out_of_memory(self, stage: str, images: int, error: Exception) -> None:
        self.oom_splits += 1
        logger.warning(
            "out of memory in %s with %d image(s) (%s: %s); %s",
            stage,
            images,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
            "splitting the batch" if images > 1 else "that image fails as image_too_large",
        )

    def _release_memory(self) -> None:
        if self._release is not None:
            try:
                self._release()
            except Exception as e:  # releasing is best effort; the retry will tell
                logger.warning("releasing memory failed: %s", e)

    async def _run_loop(self) -> None:
        while True:
            batch = await self._ready.get()
            try:
                await self._run_batch(batch)
            except Exception as error:
                self._batch_failed(batch.items, error)  # raises when the failure is fatal
            else:
                self.consecutive_failed_batches = 0
            finally:
                self._inflight_pixels -= batch.pixels
                self._pixels_freed.set()
            self._pixels_since_trim += batch.pixels
            self._maybe_trim()

    async def _run_batch(self, batch: _Batch) -> None:
        try:
            parts = await batch.prepared
        finally:
            self._set_queued(self._queued - len(batch.items))
        size = sum(part.size for part in parts)
        if size != len(batch.items):
            raise RuntimeError(f"engine.prepare returned {size} results for {len(batch.items)} images")
        start = 0
        for part in parts:
            await self._run_part(batch.items[start : start + part.size], part)
            start += part.size

    async def _run_part(self, part_items: list[Pending], prepared: PreparedBatch) -> None:
        loop = asyncio.get_running_loop()
        keep = self._live_positions(part_items)
        if not keep:
            return
        items = [part_items[i] for i in keep]
        prepared = select(prepared, keep)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(items))
            for p in items:
                self.metrics.queue_wait.observe(now - p.enqueued_at)
        outcomes = await loop.run_in_executor(self._owner, self._run_parts, prepared)
        if self.metrics is not None:
            self.metrics.stage_duration.labels(stage="infer").observe(time.monotonic() - now)
        if len(outcomes) != len(items):
            raise RuntimeError(f"engine.run returned {len(outcomes)} outcomes for {len(items)} images")
        for p, outcome in zip(items, outcomes, strict=True):
            self._count("ok" if outcome.error is None else image_outcome(outcome.error.reason), 1)
            if not p.future.done():
                p.future.set_result(outcome)

    def _batch_failed(self, items: list[Pending], error: Exception) -> None:
        """Fail one batch's requests; re-raise `error` (stopping the batcher) when it is fatal."""
        self.consecutive_failed_batches += 1
        fatal = is_fatal(error)
        limit = self.cfg.max_consecutive_failed_batches
        logger.error(
            "batch of %d images failed: %s (%d failed batch(es) in a row, limit %d)%s",
            len(items),
            type(error).__name__,
            self.consecutive_failed_batches,
            limit,
            "; fatal device error" if fatal else "",
            exc_info=error,
        )
        if fatal or self.consecutive_failed_batches >= limit:
            raise error  # _task_done fails everything pending with EngineUnavailableError and reports
        failed = BatchFailedError("the batch holding these images failed on the server; the cause is in its log")
        pending = [p for p in items if not p.future.done()]
        for p in pending:
            p.future.set_exception(failed)
        self._count("failed", len(pending))

    def _live_positions(self, items: list[Pending]) -> list[int]:
        """Positions of the items still wanted; those cancelled or past their deadline are dropped (and counted)."""
        now = time.monotonic()
        live: list[int] = []
        for i, p in enumerate(items):
            if p.future.done():
                self._count(_dropped_outcome(p, now), 1)
            elif p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExpiredError("the deadline passed before the image ran"))
                self._count("deadline_exceeded", 1)
            else:
                live.append(i)
        return live

    # -- memory --------------------------------------------------------------------------------------------------

    def _maybe_trim(self) -> None:
        """Return freed heap memory once a burst is over: enough pixels since the last trim, nothing queued."""
        limit = self.cfg.trim_after_pixels
        if not limit or self._pixels_since_trim < limit or self._queued or self._closing:
            return
        if self._trim_task is not None and not self._trim_task.done():
            return
        now = time.monotonic()
        if now - self._last_trim < self.cfg.trim_interval_s:
            return
        self._last_trim = now
        self._pixels_since_trim = 0
        self._trim_task = asyncio.get_running_loop().run_in_executor(self._decode_pool, self._trim)

    def _trim(self) -> None:
        before = rss_bytes()
        start = time.monotonic()
        if malloc_trim():
            self.trims += 1
        logger.debug(
            "malloc_trim: RSS %.0f -> %.0f MB in %.1f ms",
            before / 2**20,
            rss_bytes() / 2**20,
            (time.monotonic() - start) * 1000,
        )

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self.failure is not None:
            raise EngineUnavailableError("the embedding engine failed; the server must be restarted")
        if self._closing:
            raise EngineUnavailableError("the server is shutting down")
        if not self._tasks:
            raise EngineUnavailableError("the server is still starting")

    def _set_queued(self, value: int) -> None:
        freed = value < self._queued
        self._queued = value
        self.peak_queued = max(self.peak_queued, value)
        if self.metrics is not None:
            self.metrics.queue_depth.set(value)
        if freed:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        # Every waiter holds the current event; setting it wakes them all to re-check for room.
        self._room.set()
        self._room = asyncio.Event()

    def _count(self, outcome: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.count_images(outcome, n)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closing:
            return
        error = task.exception() or RuntimeError(f"{task.get_name()} stopped")
        logger.error("batcher task %s died; failing pending requests", task.get_name(), exc_info=error)
        self.failure = error
        self._fail_all(EngineUnavailableError("the embedding engine failed; the server must be restarted"))
        for other in self._tasks:
            other.cancel()
        if self.on_failure is not None:
            self.on_failure(error)

    def _fail_all(self, error: EngineUnavailableError) -> None:
        failed = 0
        for future in list(self._futures):
            if not future.done():
                future.set_exception(error)
                failed += 1
        self._count("failed", failed)
        self._queue.clear()
        self._set_queued(0)
        self._wake_waiters()


def _dropped_outcome(item: Pending, now: float) -> str:
    """Why a queued image whose future is already done is dropped: its deadline passed (the caller's wait ended
    with it, or gRPC cancelled the call at the deadline), else the caller went away."""
    return "deadline_exceeded" if item.deadline is not None and now >= item.deadline else "cancelled"
