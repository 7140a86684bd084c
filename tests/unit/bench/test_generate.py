"""Tests for the synthetic OCT generator (`bench/generate.py`)."""

from __future__ import annotations

import csv
import hashlib
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import uniform_filter

from bench import generate
from bench.generate import (
    CLASSES,
    REAL_COUNTS,
    SIZES,
    SPLITS,
    ImageSpec,
    encode_jpeg,
    generate_dataset,
    plan_dataset,
    render_scan,
    split_counts,
)

REAL_MANIFEST = Path(__file__).resolve().parents[2] / "data" / "oct-sample" / "manifest.csv"
FILE_NAME = re.compile(r"^(CNV|DME|DRUSEN|NORMAL)-(\d{7})-(\d+)\.jpeg$")
ALLOWED_SIZES = {(s.width, s.height) for s in SIZES}
SMALL_N = 60


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, generate.GenerateSummary]:
    out = tmp_path_factory.mktemp("oct") / "set"
    summary = generate_dataset(out, n=SMALL_N, seed=3, workers=1, progress=False)
    return out, summary


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpeg"))}


# --- counts and plan ---------------------------------------------------------------------------


def test_default_counts_are_the_real_release() -> None:
    counts = split_counts(None)
    assert counts == REAL_COUNTS
    assert sum(sum(row.values()) for row in counts.values()) == 84_484


@pytest.mark.parametrize("n", [12, 24, 100, 1_000, 5_000, 84_484])
def test_small_n_keeps_proportions_and_exact_total(n: int) -> None:
    counts = split_counts(n)
    assert sum(sum(row.values()) for row in counts.values()) == n
    quotas = {(s, c): n * REAL_COUNTS[s][c] / 84_484 for s in SPLITS for c in CLASSES}
    # Images the floor of one adds to tiny cells are taken back from the big ones.
    lifted = sum(max(0.0, 1.0 - q) for q in quotas.values())
    for (split, label), quota in quotas.items():
        assert counts[split][label] >= 1
        assert abs(counts[split][label] - quota) < 1.0 + lifted
    if n >= 100:
        train = counts["train"]
        assert train["CNV"] > train["NORMAL"] > train["DME"] > train["DRUSEN"]
    if n == 84_484:
        assert counts == REAL_COUNTS


def test_too_small_n_is_refused() -> None:
    with pytest.raises(ValueError, match="n >= 12"):
        split_counts(11)


def test_plan_patients_look_real() -> None:
    specs = plan_dataset(3_000, seed=5)
    assert len(specs) == 3_000
    assert len({s.relpath for s in specs}) == len(specs)
    for s in specs:
        assert FILE_NAME.match(s.file), s.file
    split_of: dict[int, str] = {}
    label_of: dict[int, str] = {}
    for s in specs:
        assert split_of.setdefault(s.patient_id, s.split) == s.split, "a patient is in two splits"
        assert label_of.setdefault(s.patient_id, s.label) == s.label, "a patient id is reused across classes"
    train_patients = {s.patient_id for s in specs if s.split == "train"}
    train_scans = sum(s.split == "train" for s in specs)
    assert train_scans / len(train_patients) > 3, "train patients should have several scans each"
    assert plan_dataset(3_000, seed=5) == specs
    assert plan_dataset(3_000, seed=6) != specs


# --- the written data set ----------------------------------------------------------------------


def test_layout_counts_and_manifest(small_set: tuple[Path, generate.GenerateSummary]) -> None:
    out, summary = small_set
    expected = split_counts(SMALL_N)
    assert summary.counts == expected
    assert summary.total_images == summary.generated == SMALL_N
    assert summary.skipped == 0
    for split in SPLITS:
        for label in CLASSES:
            files = sorted((out / split / label).glob("*.jpeg"))
            assert len(files) == expected[split][label]
            assert all(f.name.startswith(f"{label}-") for f in files)
    assert not list(out.rglob("*.tmp"))

    with open(out / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["split", "class", "file", "patient_id", "width", "height", "bytes"]
    assert len(rows) == SMALL_N
    for row in rows:
        path = out / row["split"] / row["class"] / row["file"]
        assert path.stat().st_size == int(row["bytes"])
        assert FILE_NAME.match(row["file"])[2] == row["patient_id"]  # type: ignore[index]
        with Image.open(path) as image:
            assert image.size == (int(row["width"]), int(row["height"]))
    assert summary.total_bytes == sum(int(r["bytes"]) for r in rows)


def test_images_are_grayscale_jpeg_of_real_sizes(small_set: tuple[Path, generate.GenerateSummary]) -> None:
    out, _ = small_set
    for path in out.rglob("*.jpeg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "L"
            assert image.size in ALLOWED_SIZES
            pixels = np.asarray(image)
        # Dark background: the top and bottom rows are mostly dark, apart from white device wedges.
        edge = np.concatenate([pixels[10:30].ravel(), pixels[-40:-10].ravel()])
        assert np.median(edge[edge < 250]) < 45


def test_rerun_keeps_existing_files_and_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "set"
    generate_dataset(out, n=24, seed=1, workers=1, progress=False)
    before = _hashes(out)
    victim = out / sorted(before)[0]
    victim.unlink()
    (out / (sorted(before)[1] + ".tmp")).write_bytes(b"partial")  # left by an interrupted write
    summary = generate_dataset(out, n=24, seed=1, workers=1, progress=False)
    assert summary.generated == 1
    assert summary.skipped == 23
    assert _hashes(out) == before
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(ValueError, match="empty --out directory"):
        generate_dataset(out, n=24, seed=2, workers=1, progress=False)


def test_bytes_do_not_depend_on_worker_count(tmp_path: Path) -> None:
    one = generate_dataset(tmp_path / "one", n=24, seed=7, workers=1, progress=False)
    two = generate_dataset(tmp_path / "two", n=24, seed=7, workers=2, progress=False)
    assert one.workers == 1
    assert two.workers == 2
    hashes = _hashes(tmp_path / "one")
    assert len(hashes) == 24
    assert hashes == _hashes(tmp_path / "two")
    assert (tmp_path / "one" / "manifest.csv").read_bytes() == (tmp_path / "two" / "manifest.csv").read_bytes()


def test_image_depends_on_its_own_entry_only() -> None:
    spec = ImageSpec("test", "DME", 4, 1_234_567, 2)
    first = render_scan(spec, seed=11)
    assert np.array_equal(render_scan(spec, seed=11), first)
    assert not np.array_equal(render_scan(ImageSpec("test", "DME", 5, 1_234_567, 2), seed=11), first)
    assert not np.array_equal(render_scan(spec, seed=12), first)


# --- calibration against the real sample -------------------------------------------------------


def test_median_file_size_matches_the_real_sample() -> None:
    with open(REAL_MANIFEST, newline="", encoding="utf-8") as handle:
        real_median = statistics.median(int(row["bytes"]) for row in csv.DictReader(handle))
    specs = plan_dataset(2_000, seed=0)[::42]  # 48 scans of many patients, in the generated size mix
    sizes = [len(encode_jpeg(render_scan(spec, seed=0))) for spec in specs]
    ratio = statistics.median(sizes) / real_median
    assert 0.8 <= ratio <= 1.2, f"median {statistics.median(sizes)} bytes vs real {real_median}"


def _profile_features(pixels: np.ndarray) -> np.ndarray:
    """Generic features that know nothing of the generator: the scan flattened on its lowest
    bright band (the RPE), then the mean and the spread of each depth, and the band's roughness."""
    a = pixels.astype(np.float32)
    a[a >= 250] = 0.0  # white device wedges carry no anatomy
    smooth = uniform_filter(a, (7, 9))
    bright = smooth >= 0.7 * smooth.max(axis=0)[None, :]
    rpe = a.shape[0] - 1 - np.argmax(bright[::-1], axis=0)
    rpe_smooth = np.round(uniform_filter(rpe.astype(np.float32), 41)).astype(int)
    rows = np.clip(rpe_smooth[None, :] + np.arange(-140, 40)[:, None], 0, a.shape[0] - 1)
    flat = np.take_along_axis(uniform_filter(a, 3), rows, axis=0)
    mean = flat.mean(axis=1).reshape(-1, 4).mean(axis=1)
    spread = flat.std(axis=1).reshape(-1, 4).mean(axis=1)
    return np.concatenate([mean, spread, [np.abs(rpe - rpe_smooth).mean()]])


def _labelled_features(seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for label_idx, label in enumerate(CLASSES):
        for i in range(per_class):
            spec = ImageSpec("train", label, i, 2_000_000 + 100_000 * seed + 17 * i, 1)
            features.append(_profile_features(render_scan(spec, seed=seed)))
            labels.append(label_idx)
    return np.array(features), np.array(labels)


def test_classes_differ_in_a_way_a_simple_method_can_see() -> None:
    # Nearest centroid on generic depth profiles, fitted on one seed's patients and scored on
    # another's. Chance is 0.25; the class lesions (cysts, drusen, CNV, fluid) must lift it well
    # above that, and no class may be unrecognisable.
    x_fit, y_fit = _labelled_features(seed=21, per_class=12)
    x_test, y_test = _labelled_features(seed=22, per_class=12)
    mu, sd = x_fit.mean(axis=0), x_fit.std(axis=0) + 1e-6
    z_fit, z_test = (x_fit - mu) / sd, (x_test - mu) / sd
    centroids = np.stack([z_fit[y_fit == c].mean(axis=0) for c in range(len(CLASSES))])
    predicted = ((z_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = float((predicted == y_test).mean())
    recall = [float((predicted[y_test == c] == c).mean()) for c in range(len(CLASSES))]
    assert accuracy >= 0.6, (accuracy, recall)
    assert min(recall) >= 0.4, (accuracy, recall)


# --- command line ------------------------------------------------------------------------------


def test_main_writes_a_set(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path / "cli"), "--n", "12", "--seed", "4", "--workers", "1", "--quiet"]) == 0
    assert len(list((tmp_path / "cli").rglob("*.jpeg"))) == 12
    assert generate.main(["--out", str(tmp_path / "bad"), "--n", "5", "--quiet"]) == 2
