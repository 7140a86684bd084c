"""The metrics registry: independent registries, fixed label values."""

from __future__ import annotations

from service.metrics import Metrics, image_outcome


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
