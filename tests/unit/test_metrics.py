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


def test_gpu_memory_gauge_reports_device_totals_beside_the_allocator() -> None:
    m = Metrics()
    m.track_gpu_memory(lambda: (1024, 4096))
    m.track_gpu_device_memory(lambda: (3 << 30, 8 << 30))
    got = {kind: m.registry.get_sample_value("embedserve_gpu_memory_bytes", {"kind": kind}) for kind in KINDS}
    assert got == {"allocated": 1024, "reserved": 4096, "device_free": 3 << 30, "device_total": 8 << 30}


KINDS = ("allocated", "reserved", "device_free", "device_total")
