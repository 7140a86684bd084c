"""The error edge: the code table, `abort`, request ids and the RPC decorators (no gRPC server needed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc
import pytest

from service.analysis.cluster import BackendUnavailableError, ClusterInterruptedError
from service.api.clusterer import ClustererServicer
from service.api.embedder import EmbedderServicer
from service.api.errors import (
    CallGate,
    InvalidRequestError,
    NotAvailableYetError,
    image_error_from_status,
    image_status,
    request_id,
    rpc_status,
    stream_rpc,
    unary_rpc,
)
from service.config import load_config
from service.embedding.batcher import DeadlineExpiredError, EngineUnavailableError, OverloadedError
from service.errors import (
    BatchFailedError,
    ClusterRequestError,
    CollectionNotFoundError,
    EmbedServeError,
    ImageTooLargeError,
    InvalidImageError,
    ModelError,
    NoIndexError,
    UnsupportedImageError,
)
from service.metrics import Metrics
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb


def test_errors_map_to_codes_and_internal_errors_stay_private() -> None:
    cases = {
        OverloadedError("busy"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        DeadlineExpiredError("late"): grpc.StatusCode.DEADLINE_EXCEEDED,
        EngineUnavailableError("down"): grpc.StatusCode.UNAVAILABLE,
        InvalidRequestError("too many"): grpc.StatusCode.INVALID_ARGUMENT,
        NotAvailableYetError("store"): grpc.StatusCode.FAILED_PRECONDITION,
    }
    for error, code in cases.items():
        assert rpc_status(error) == (code, str(error))
    code, message = rpc_status(KeyError("/secret/path/to/weights.pt"), "rid-1")
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "rid-1" in message


def test_image_errors_round_trip() -> None:
    for error in (InvalidImageError("bad"), UnsupportedImageError("cmyk"), ImageTooLargeError("huge")):
        code, reason, message = image_status(error)
        assert code == 3
        back = image_error_from_status(code, reason, message)
        assert type(back) is type(error) and back.message == error.message
    unknown = image_error_from_status(3, "some_future_reason", "m")
    assert unknown.reason == "some_future_reason"


# -- one edge for both servicers ------------------------------------------------------------------------------------


class FakeContext:
    """What the servicers use of a grpc.aio context; `abort` records the status and raises like the real one."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()

    def time_remaining(self) -> float | None:
        return None


class FailingIndex:
    """An index whose every lookup raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def info(self, collection: str) -> None:
        raise self.error

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> None:
        raise self.error


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return list(dict.fromkeys(found))


def _status(call: Callable[[FakeContext], Coroutine[Any, Any, Any]], rid: str = "") -> tuple[grpc.StatusCode, str]:
    async def run() -> FakeContext:
        request_id.set(rid)
        context = FakeContext()
        with pytest.raises(grpc.aio.AbortError):
            await call(context)
        return context

    context = asyncio.run(run())
    assert context.code is not None
    return context.code, context.details


def _via_embedder(error: BaseException, rid: str = "") -> tuple[grpc.StatusCode, str]:
    cfg = load_config(env={}, overrides={"server.metrics_port": -1})
    servicer = EmbedderServicer(cfg, FailingIndex(error), Metrics(), gate=CallGate())  # type: ignore[arg-type]
    try:
        return _status(lambda ctx: servicer.GetCollectionInfo(pb.GetCollectionInfoRequest(collection="c"), ctx), rid)
    finally:
        servicer.close()


def _via_clusterer(error: BaseException, rid: str = "") -> tuple[grpc.StatusCode, str]:
    servicer = ClustererServicer(FailingIndex(error))  # type: ignore[arg-type]
    return _status(lambda ctx: servicer.Cluster(cpb.ClusterRequest(collection="c"), ctx), rid)


def test_every_embedserve_error_maps_to_the_same_status_from_both_servicers() -> None:
    # The server's own errors (the client's RemoteError and test doubles are never raised inside a servicer).
    classes = [
        cls
        for cls in _subclasses(EmbedServeError)
        if cls.__module__.startswith("service.") and not cls.__module__.startswith("service.client")
    ]
    assert len(classes) > 20
    for cls in classes:
        error = cls("boom")
        # The same request id for both: an INTERNAL always names one (generated when no interceptor set it).
        from_embedder, from_clusterer = _via_embedder(error, "rid-7"), _via_clusterer(error, "rid-7")
        assert from_embedder == from_clusterer, cls
        assert from_embedder == rpc_status(error, "rid-7"), cls


def test_the_clusterer_errors_and_batch_failures_map_by_class() -> None:
    cases: dict[EmbedServeError, grpc.StatusCode] = {
        ClusterRequestError("no attribute"): grpc.StatusCode.INVALID_ARGUMENT,
        NoIndexError("no index"): grpc.StatusCode.UNAVAILABLE,
        ClusterInterruptedError("late"): grpc.StatusCode.DEADLINE_EXCEEDED,
        BackendUnavailableError("no cuML"): grpc.StatusCode.FAILED_PRECONDITION,
        CollectionNotFoundError("no collection 'x'"): grpc.StatusCode.NOT_FOUND,
    }
    for error, code in cases.items():
        assert _via_clusterer(error) == (code, str(error))
        assert _via_embedder(error) == (code, str(error))
    for error in (BatchFailedError("batch 7 died: CUDA OOM at /secret"), ModelError("/secret/weights.pt")):
        code, message = _via_clusterer(error, rid="rid-7")
        assert code == grpc.StatusCode.INTERNAL and "rid-7" in message and "secret" not in message


def test_unknown_errors_are_internal_with_the_request_id_in_the_message_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for via in (_via_embedder, _via_clusterer):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="service.api.errors"):
            code, message = via(RuntimeError("/secret/path/to/weights.pt"), "rid-42")
        assert code == grpc.StatusCode.INTERNAL
        assert "rid-42" in message and "secret" not in message
        logged = [r for r in caplog.records if "rid-42" in r.getMessage()]
        assert logged and logged[0].exc_info is not None and "secret" in str(logged[0].exc_info[1])


class Gated:
    def __init__(self) -> None:
        self.gate = CallGate()
        self.seen_in_flight: list[int] = []

    @unary_rpc
    async def Unary(self, request: int, context: FakeContext) -> int:
        self.seen_in_flight.append(self.gate.in_flight)
        if request < 0:
            raise InvalidRequestError(f"{request} is negative")
        return request * 2

    @stream_rpc
    async def Stream(self, request: int, context: FakeContext) -> AsyncIterator[int]:
        for i in range(request):
            self.seen_in_flight.append(self.gate.in_flight)
            yield i
        raise OverloadedError("no more")


def test_decorators_count_calls_in_flight_and_refuse_new_ones_while_draining() -> None:
    async def run() -> None:
        s = Gated()
        ctx = FakeContext()
        assert await s.Unary(3, ctx) == 6  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AbortError):
            await s.Unary(-1, ctx)  # type: ignore[arg-type]
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in ctx.details
        got: list[int] = []
        with pytest.raises(grpc.aio.AbortError):
            async for value in s.Stream(3, ctx):  # type: ignore[arg-type]
                got.append(value)
        assert got == [0, 1, 2] and ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.seen_in_flight == [1, 1, 1, 1, 1] and s.gate.in_flight == 0
        assert await s.gate.drain(0.1)
        with pytest.raises(grpc.aio.AbortError):
            await s.Unary(1, ctx)  # type: ignore[arg-type]
        assert ctx.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(run())
