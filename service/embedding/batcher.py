"""Dynamic batching shared by every request of the server.

Images of many small concurrent requests run together through one forward pass:

    embed() ──► queue ──► collector ──► decode pool ──► ready (bounded) ──► runner ──► owner thread
    (admission:          (one deadline     (engine.prepare,  (backpressure)   (drops cancelled   (engine.run)
     max_queue_size)      per batch)        off the loop)                       and expired)

- Admission: a request whose images do not fit in `max_queue_size` is refused at once with `OverloadedError`
  (or, with `wait=True`, waits for room: streams use that for flow control). Nothing grows without bound.
- The collector closes a batch at `max_batch_size` images or at first arrival + `max_queue_delay_ms`, drops
  items whose future is already done (cancelled call, expired deadline), and hands the batch to the decode
  pool. Decoding of the next batch overlaps the forward pass of the current one.
- The runner is the only caller of `engine.run`, on a single owner thread; before running it drops items
  cancelled or expired while they were decoded, so their images never reach the model.
- Failure policy: one image's bad bytes are that image's error (decode never raises for them). An unexpected
  exception while a batch is prepared or run fails that batch's futures with `BatchFailedError` (INTERNAL at the
  edge, the cause only in the log) and the batcher goes on. Only a fatal condition stops it: an error that
  `service.embedding.faults.is_fatal` recognises (a CUDA error that poisons the context), or
  `max_consecutive_failed_batches` failed batches in a row. Then, as when a background task dies, every pending
  future fails with `EngineUnavailableError` and `on_failure` is called (the server flips health to NOT_SERVING).
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
from service.embedding.faults import is_fatal
from service.errors import (  # noqa: F401  (re-exported: callers import these from the batcher too)
    BatchFailedError,
    DeadlineExpiredError,
    EmbedServeError,
    EngineUnavailableError,
    ImageError,
    OverloadedError,
)
from service.metrics import Metrics, image_outcome
from service.types import EmbedOutcome

logger = logging.getLogger(__name__)


class BatchEngine(Protocol):
    """The part of `service.embedding.engine.Engine` the batcher uses."""

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch: ...

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]: ...


@dataclass(slots=True)
class Pending:
    """One image waiting for its forward pass."""

    data: bytes
    future: asyncio.Future[EmbedOutcome]
    enqueued_at: float
    """`time.monotonic()` at admission."""
    deadline: float | None
    """`time.monotonic()` after which the image is dropped; None for no deadline."""


@dataclass(slots=True)
class _Batch:
    """A closed batch, decoding in the pool or decoded."""

    items: list[Pending]
    prepared: asyncio.Future[PreparedBatch]


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
        items = [Pending(data=d, future=loop.create_future(), enqueued_at=now, deadline=deadline) for d in datas]
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
            close_at = first.enqueued_at + self._delay
            while len(batch) < self.cfg.max_batch_size:
                item = await self._next_item(close_at)
                if item is None:
                    break
                batch.append(item)
            batch = [batch[i] for i in self._live_positions(batch)]
            if not batch:
                continue
            prepared = loop.run_in_executor(self._decode_pool, self._prepare, [p.data for p in batch])
            await self._ready.put(_Batch(items=batch, prepared=prepared))

    async def _next_item(self, close_at: float | None) -> Pending | None:
        """The next live queued item; None once `close_at` (monotonic) has passed. Drops done items."""
        while True:
            while self._queue:
                item = self._queue.popleft()
                if not item.future.done():
                    return item
                self._set_queued(self._queued - 1)
                self._count("cancelled", 1)
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

    def _prepare(self, datas: list[bytes]) -> PreparedBatch:
        start = time.monotonic()
        prepared = self.engine.prepare(datas)
        if self.metrics is not None:
            self.metrics.stage_duration.labels(stage="decode").observe(time.monotonic() - start)
        return prepared

    async def _run_loop(self) -> None:
        while True:
            batch = await self._ready.get()
            try:
                await self._run_batch(batch)
            except Exception as error:
                self._batch_failed(batch.items, error)  # raises when the failure is fatal
            else:
                self.consecutive_failed_batches = 0

    async def _run_batch(self, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        try:
            prepared = await batch.prepared
        finally:
            self._set_queued(self._queued - len(batch.items))
        if prepared.size != len(batch.items):
            raise RuntimeError(f"engine.prepare returned {prepared.size} results for {len(batch.items)} images")
        keep = self._live_positions(batch.items)
        if not keep:
            return
        items = [batch.items[i] for i in keep]
        prepared = select(prepared, keep)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(items))
            for p in items:
                self.metrics.queue_wait.observe(now - p.enqueued_at)
        outcomes = await loop.run_in_executor(self._owner, self.engine.run, prepared)
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
                self._count("cancelled", 1)
            elif p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExpiredError("the deadline passed before the image ran"))
                self._count("deadline_exceeded", 1)
            else:
                live.append(i)
        return live

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
