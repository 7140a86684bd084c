"""The dynamic batcher against a fake engine: batching, admission, deadlines, cancellation, failure."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from service.config import BatcherConfig
from service.embedding.batcher import Batcher, DeadlineExpiredError, EngineUnavailableError, OverloadedError, select
from service.embedding.engine import PreparedBatch
from service.errors import BatchFailedError, ImageError, ImageTooLargeError, InvalidImageError
from service.metrics import Metrics
from service.types import EmbedOutcome


def image(value: int) -> bytes:
    """Fake encoded bytes whose 'embedding' is [value]."""
    return bytes([value])


class FakeEngine:
    """prepare: b"bad" fails, other bytes become a row [first byte]; run: sleeps `delay`, returns the rows."""

    def __init__(self, delay: float = 0.0, fail_run: bool = False) -> None:
        self.delay = delay
        self.fail_run = fail_run
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()
        self.run_error: Exception | None = None
        """Raised by `run` for batches holding the image b"boom" (and by `prepare` for b"crash")."""

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        if any(d == b"crash" for d in datas):
            raise TypeError("'float' object cannot be interpreted as an integer")
        errors: dict[int, ImageError] = {}
        rows: list[list[float]] = []
        positions: list[int] = []
        for i, data in enumerate(datas):
            if isinstance(data, ImageError):
                errors[i] = data
            elif data == b"bad":
                errors[i] = InvalidImageError("not an image")
            else:
                rows.append([float(data[0])])
                positions.append(i)
        batch = np.array(rows, dtype=np.float32) if rows else None
        return PreparedBatch(size=len(datas), batch=batch, ok_positions=positions, errors=errors)  # type: ignore[arg-type]

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        if self.fail_run:
            raise RuntimeError("device lost")
        if prepared.batch is not None and self.run_error is not None and 98 in prepared.batch[:, 0]:
            raise self.run_error
        time.sleep(self.delay)
        outcomes = [EmbedOutcome() for _ in range(prepared.size)]
        for i, err in prepared.errors.items():
            outcomes[i].error = err
        values: list[int] = []
        if prepared.batch is not None:
            for row, i in enumerate(prepared.ok_positions):
                outcomes[i].vector = np.asarray(prepared.batch[row])
                values.append(int(prepared.batch[row][0]))
        with self.lock:
            self.batches.append(values)
        return outcomes

    @property
    def ran(self) -> list[int]:
        return [v for batch in self.batches for v in batch]


def config(**kw: float) -> BatcherConfig:
    defaults: dict[str, float] = {"max_batch_size": 4, "max_queue_delay_ms": 30, "max_queue_size": 64}
    defaults.update(kw)
    return BatcherConfig(**defaults)  # type: ignore[arg-type]


def run(coro_fn, engine: FakeEngine, cfg: BatcherConfig, **kw):  # type: ignore[no-untyped-def]
    """Run `coro_fn(batcher)` with a started batcher, then close it."""

    async def main():  # type: ignore[no-untyped-def]
        batcher = Batcher(engine, cfg, **kw)
        await batcher.start()
        try:
            return await coro_fn(batcher)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_concurrent_requests_share_batches() -> None:
    engine = FakeEngine(delay=0.02)
    metrics = Metrics()

    async def scenario(b: Batcher) -> list[list[EmbedOutcome]]:
        return await asyncio.gather(*(b.embed([image(v)]) for v in range(1, 11)))

    results = run(scenario, engine, config(), metrics=metrics)
    assert [int(r[0].vector[0]) for r in results] == list(range(1, 11))  # type: ignore[index]
    assert sorted(engine.ran) == list(range(1, 11))
    assert max(len(b) for b in engine.batches) > 1
    assert all(len(b) <= 4 for b in engine.batches)
    assert metrics.registry.get_sample_value("embedserve_images_total", {"outcome": "ok"}) == 10
    assert metrics.registry.get_sample_value("embedserve_batch_size_count") == len(engine.batches)


def test_a_bad_image_fails_alone() -> None:
    engine = FakeEngine()

    async def scenario(b: Batcher) -> list[EmbedOutcome]:
        return await b.embed([image(1), b"bad", image(3)])

    out = run(scenario, engine, config())
    assert out[0].ok and out[2].ok
    assert isinstance(out[1].error, InvalidImageError)
    assert [int(o.vector[0]) for o in (out[0], out[2])] == [1, 3]  # type: ignore[index]


def test_full_queue_refuses_at_once_and_stays_bounded() -> None:
    engine = FakeEngine(delay=0.1)
    metrics = Metrics()

    async def scenario(b: Batcher) -> tuple[int, int]:
        results = await asyncio.gather(*(b.embed([image(v)]) for v in range(1, 21)), return_exceptions=True)
        refused = sum(isinstance(r, OverloadedError) for r in results)
        served = sum(isinstance(r, list) for r in results)
        return refused, served

    refused, served = run(scenario, engine, config(max_batch_size=2, max_queue_size=4), metrics=metrics)
    assert refused > 0 and served > 0 and refused + served == 20
    assert metrics.registry.get_sample_value("embedserve_images_total", {"outcome": "rejected"}) == refused


def test_peak_queue_never_exceeds_limit() -> None:
    engine = FakeEngine(delay=0.05)

    async def scenario(b: Batcher) -> int:
        await asyncio.gather(*(b.embed([image(v)]) for v in range(1, 31)), return_exceptions=True)
        return b.peak_queued

    assert run(scenario, engine, config(max_batch_size=2, max_queue_size=3)) <= 3


def test_waiting_admission_serves_everyone() -> None:
    engine = FakeEngine(delay=0.02)

    async def scenario(b: Batcher) -> list[list[EmbedOutcome]]:
        return await asyncio.gather(*(b.embed([image(v)], wait=True) for v in range(1, 13)))

    results = run(scenario, engine, config(max_batch_size=2, max_queue_size=2))
    assert [int(r[0].vector[0]) for r in results] == list(range(1, 13))  # type: ignore[index]


def test_request_larger_than_queue_is_refused() -> None:
    async def scenario(b: Batcher) -> None:
        with pytest.raises(OverloadedError, match="never fit"):
            await b.embed([image(1)] * 5, wait=True)

    run(scenario, FakeEngine(), config(max_batch_size=2, max_queue_size=4))


def test_expired_deadline_drops_images_before_they_run() -> None:
    engine = FakeEngine(delay=0.3)

    async def scenario(b: Batcher) -> None:
        first = asyncio.create_task(b.embed([image(1), image(2)]))
        await asyncio.sleep(0.1)  # the first batch is running now
        with pytest.raises(DeadlineExpiredError):
            await b.embed([image(9)], timeout=0.05)
        await first
        await asyncio.sleep(0.35)  # give the runner time to (not) run the expired image

    run(scenario, engine, config(max_queue_delay_ms=5))
    assert 9 not in engine.ran
    assert sorted(engine.ran) == [1, 2]


def test_cancelled_call_drops_its_images() -> None:
    engine = FakeEngine(delay=0.3)

    async def scenario(b: Batcher) -> None:
        first = asyncio.create_task(b.embed([image(1)]))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(b.embed([image(7), image(8)]))
        await asyncio.sleep(0.05)
        second.cancel()
        await first
        await asyncio.sleep(0.35)

    run(scenario, engine, config(max_queue_delay_ms=5))
    assert engine.ran == [1]


def test_engine_failure_fails_pending_and_reports() -> None:
    failures: list[BaseException] = []

    async def scenario(b: Batcher) -> None:
        results = await asyncio.gather(*(b.embed([image(v)]) for v in (1, 2, 3)), return_exceptions=True)
        assert all(isinstance(r, EngineUnavailableError) for r in results)
        assert b.failure is not None and not b.running
        with pytest.raises(EngineUnavailableError):
            await b.embed([image(4)])

    # The fatal path: with a limit of one failed batch, the first failure stops the batcher.
    run(scenario, FakeEngine(fail_run=True), config(max_consecutive_failed_batches=1), on_failure=failures.append)
    assert len(failures) == 1 and "device lost" in str(failures[0])


def test_not_started_and_closed_batcher_refuse() -> None:
    async def scenario() -> None:
        b = Batcher(FakeEngine(), config())
        with pytest.raises(EngineUnavailableError, match="starting"):
            await b.embed([image(1)])
        await b.start()
        await b.close()
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await b.embed([image(1)])

    asyncio.run(scenario())


def test_select_renumbers_positions_and_rows() -> None:
    prepared = PreparedBatch(
        size=4,
        batch=np.array([[10.0], [30.0], [40.0]]),  # type: ignore[arg-type]
        ok_positions=[0, 2, 3],
        errors={1: InvalidImageError("x")},
    )
    sub = select(prepared, [1, 3])
    assert sub.size == 2
    assert sub.ok_positions == [1]
    assert sub.batch is not None and sub.batch.tolist() == [[40.0]]
    assert list(sub.errors) == [0]
    none_left = select(prepared, [1])
    assert none_left.batch is None and none_left.ok_positions == [] and list(none_left.errors) == [0]


BOOM = bytes([98])
"""An image whose batch the fake engine's `run` fails (its 'embedding' would be [98])."""


async def _alone(b: Batcher, data: bytes) -> list[EmbedOutcome] | BaseException:
    try:
        return await b.embed([data])
    except Exception as e:
        return e


def test_a_failed_batch_fails_only_its_requests_and_the_batcher_keeps_serving() -> None:
    engine = FakeEngine()
    engine.run_error = RuntimeError("cuBLAS workspace exhausted (internal detail)")
    failures: list[BaseException] = []

    async def scenario(b: Batcher) -> tuple[object, object, object]:
        before = await _alone(b, image(1))
        failed = await _alone(b, BOOM)
        after = await _alone(b, image(2))
        return before, failed, after

    before, failed, after = run(scenario, engine, config(max_queue_delay_ms=1), on_failure=failures.append)
    assert isinstance(failed, BatchFailedError)
    assert "internal detail" not in str(failed)  # the cause stays in the server log
    assert isinstance(before, list) and isinstance(after, list)
    assert [int(before[0].vector[0]), int(after[0].vector[0])] == [1, 2]  # type: ignore[index]
    assert failures == []


def test_a_crash_in_prepare_fails_that_batch_and_others_still_run() -> None:
    failures: list[BaseException] = []
    metrics = Metrics()

    async def scenario(b: Batcher) -> tuple[object, object]:
        crashed = await _alone(b, b"crash")
        ok = await _alone(b, image(5))
        return crashed, ok

    crashed, ok = run(scenario, FakeEngine(), config(max_queue_delay_ms=1), metrics=metrics, on_failure=failures.append)
    assert isinstance(crashed, BatchFailedError)
    assert isinstance(ok, list) and int(ok[0].vector[0]) == 5  # type: ignore[index]
    assert failures == []
    assert metrics.registry.get_sample_value("embedserve_images_total", {"outcome": "failed"}) == 1


def test_consecutive_failed_batches_reach_the_limit_and_stop_the_batcher() -> None:
    engine = FakeEngine()
    engine.run_error = RuntimeError("flaky")
    failures: list[BaseException] = []
    limit = 3

    async def scenario(b: Batcher) -> list[object]:
        results = [await _alone(b, BOOM) for _ in range(limit)]
        results.append(await _alone(b, image(1)))
        return results

    results = run(scenario, engine, config(max_queue_delay_ms=1, max_consecutive_failed_batches=limit),
                  on_failure=failures.append)  # fmt: skip
    assert all(isinstance(r, BatchFailedError) for r in results[: limit - 1])
    assert isinstance(results[limit - 1], EngineUnavailableError)  # the batch that reached the limit
    assert isinstance(results[limit], EngineUnavailableError)  # and everything after it
    assert len(failures) == 1 and "flaky" in str(failures[0])


def test_a_good_batch_resets_the_failure_count() -> None:
    engine = FakeEngine()
    engine.run_error = RuntimeError("flaky")
    failures: list[BaseException] = []

    async def scenario(b: Batcher) -> list[object]:
        sequence = [BOOM, image(1), BOOM, image(2), BOOM, image(3)]
        return [await _alone(b, data) for data in sequence]

    results = run(scenario, engine, config(max_queue_delay_ms=1, max_consecutive_failed_batches=2),
                  on_failure=failures.append)  # fmt: skip
    assert [type(r).__name__ for r in results] == ["BatchFailedError", "list"] * 3
    assert failures == []


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
    ],
)
def test_a_fatal_cuda_error_stops_the_batcher_at_once(message: str) -> None:
    engine = FakeEngine()
    engine.run_error = RuntimeError(message)
    failures: list[BaseException] = []

    async def scenario(b: Batcher) -> tuple[object, object]:
        first = await _alone(b, BOOM)
        return first, await _alone(b, image(1))

    first, second = run(scenario, engine, config(max_queue_delay_ms=1), on_failure=failures.append)
    assert isinstance(first, EngineUnavailableError) and isinstance(second, EngineUnavailableError)
    assert len(failures) == 1 and str(failures[0]) == message


def test_cuda_out_of_memory_is_not_fatal() -> None:
    # Out of memory is not a batch failure any more (issue 11 item 5): an image that runs out of memory alone
    # fails as image_too_large, in a normal reply; the batcher keeps serving.
    engine = FakeEngine()
    engine.run_error = RuntimeError("CUDA error: out of memory")
    failures: list[BaseException] = []

    async def scenario(b: Batcher) -> tuple[object, object]:
        return await _alone(b, BOOM), await _alone(b, image(4))

    failed, ok = run(scenario, engine, config(max_queue_delay_ms=1), on_failure=failures.append)
    assert isinstance(failed, list) and isinstance(failed[0].error, ImageTooLargeError)
    assert isinstance(ok, list) and failures == []


def test_failed_batch_limit_is_validated() -> None:
    with pytest.raises(ValueError, match="max_consecutive_failed_batches"):
        BatcherConfig(max_consecutive_failed_batches=0)
