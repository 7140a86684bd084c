"""Edge mapping of errors to gRPC codes, and the metrics registry."""

from __future__ import annotations

import grpc

from service.api.errors import (
    InvalidRequestError,
    NotAvailableYetError,
    image_error_from_status,
    image_status,
    rpc_status,
)
from service.embedding.batcher import DeadlineExpiredError, EngineUnavailableError, OverloadedError
from service.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageError
from service.metrics import Metrics, image_outcome


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


def test_metrics_registries_are_independent_and_labels_fixed() -> None:
    a, b = Metrics(), Metrics()
    a.count_images("ok", 3)
    assert a.registry.get_sample_value("embedserve_images_total", {"outcome": "ok"}) == 3
    assert b.registry.get_sample_value("embedserve_images_total", {"outcome": "ok"}) == 0
    assert image_outcome("invalid_image") == "invalid_image"
    assert image_outcome("a key or a path") == "image_error"
    a.track_gpu_memory(lambda: (1024, 4096))
    assert a.registry.get_sample_value("embedserve_gpu_memory_bytes", {"kind": "reserved"}) == 4096
    assert b"embedserve_gpu_memory_bytes" in a.exposition()
