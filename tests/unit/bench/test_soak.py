"""The soak's arithmetic and verdict on synthetic curves (the real run is tests/e2e/test_soak.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from bench.soak import ACTIONS, Tally, _verdict, floor_curve, large_jpeg, slope_per_minute


def args(max_slope: float = 5.0) -> argparse.Namespace:
    return argparse.Namespace(minutes=10.0, clients=4, device="cpu", large_pixels=1000, max_slope=max_slope)


def served() -> Tally:
    tally = Tally()
    for action in ACTIONS:
        tally.add(action, "ok")
    return tally


def test_slope_matches_numpy_least_squares() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(0.0, 300.0, 1.0)
    v = 1500.0 + 0.2 * t + rng.normal(0, 30, t.size)
    assert slope_per_minute(t, v) == pytest.approx(np.polyfit(t, v, 1)[0] * 60.0, rel=1e-9)
    assert slope_per_minute([5.0], [1.0]) == 0.0


def curve(mb_per_min: float, seconds: int = 600) -> list[list[float]]:
    rng = np.random.default_rng(1)
    return [[float(t), 1200.0 + mb_per_min * t / 60.0 + float(rng.normal(0, 20)), float(t)] for t in range(seconds)]


def test_a_flat_noisy_curve_passes_and_a_leak_fails() -> None:
    flat = _verdict(curve(0.0), served(), "SERVING", args(), stuck=0)
    assert flat["passed"] and abs(flat["slope_mb_per_min"]) < 2.0
    leak = _verdict(curve(20.0), served(), "SERVING", args(), stuck=0)
    assert not leak["passed"] and "floor grows" in leak["failures"][0]
    assert leak["slope_mb_per_min"] == pytest.approx(20.0, abs=2.0)
    assert leak["floor_slope_mb_per_min"] == pytest.approx(20.0, abs=4.0)


def test_spikes_of_large_images_do_not_fail_a_flat_floor() -> None:
    rng = np.random.default_rng(2)
    samples = [[float(t), 1400.0 + float(rng.normal(0, 3)), 0.0] for t in range(600)]
    for t in range(452, 600, 3):  # late spikes: a large image every 3 s towards the end
        samples[t][1] += 200.0
    result = _verdict(samples, served(), "SERVING", args(), stuck=0)
    assert result["slope_mb_per_min"] > 5.0  # every sample: the spikes tilt the fit
    assert abs(result["floor_slope_mb_per_min"]) < 1.0 and result["passed"]


def test_floor_curve_takes_each_windows_lowest_sample() -> None:
    samples = [[0.0, 5.0], [5.0, 3.0], [14.0, 9.0], [15.0, 7.0], [29.0, 8.0], [31.0, 1.0]]
    assert floor_curve(samples, 15.0) == [(5.0, 3.0), (15.0, 7.0)]  # the last window is too short to count
    assert floor_curve([*samples, [40.0, 2.0]], 15.0) == [(5.0, 3.0), (15.0, 7.0), (31.0, 1.0)]
    assert floor_curve([]) == []


def test_only_the_last_half_counts() -> None:
    warmup_then_flat = [[float(t), 800.0 + min(t, 200) * 3.0, 0.0] for t in range(600)]
    assert _verdict(warmup_then_flat, served(), "SERVING", args(), stuck=0)["passed"]


def test_unexpected_replies_missing_traffic_and_bad_health_fail() -> None:
    tally = served()
    tally.add("valid", "unexpected", "INTERNAL: boom")
    result = _verdict(curve(0.0), tally, "NOT_SERVING", args(), stuck=1)
    text = "; ".join(result["failures"])
    assert "unexpected" in text and "NOT_SERVING" in text and "still waiting" in text
    partial = Tally()
    partial.add("valid", "ok")
    assert "no successful bad" in "; ".join(_verdict(curve(0.0), partial, "SERVING", args(), stuck=0)["failures"])


def test_the_large_image_has_the_pixels_asked_for() -> None:
    import io

    with Image.open(io.BytesIO(large_jpeg(120_000))) as im:
        assert im.format == "JPEG" and abs(im.width * im.height - 120_000) < 800
