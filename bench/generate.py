"""Synthetic twin of the Kermany 2018 retinal OCT data set (the "OCT2017" release).

The real set (84,484 JPEGs) cannot be downloaded on the project's machines, so the benchmark suite
makes a stand-in with the same layout, file names, image sizes, byte sizes and rough look:

    OUT/train|test|val/CNV|DME|DRUSEN|NORMAL/CLASS-PATIENT-N.jpeg
    OUT/manifest.csv   (split, class, file, patient_id, width, height, bytes)
    OUT/generator.json (the settings that made it; a re-run must use the same ones)

**Clustering or classification scores measured on these synthetic images are not scores on real
OCT.** The images are drawn by a simple procedural model (a layered retina band with a foveal pit,
multiplicative speckle, and one cartoon lesion type per class); they are meant for measuring speed
and for smoke-testing the pipeline, and a model may find them far easier (or harder) to separate
than real scans. Point the same commands at the real set for quality numbers.

Calibration (on the 32 real scans in `tests/data/oct-sample`, a copy of `../shared/data/oct-sample`):
- 8-bit grayscale baseline JPEG at quality 75 (the real files' quantisation tables are libjpeg's
  standard tables at quality 75);
- sizes: the sample holds 512x496 (24 of 32) and 768x496 (8 of 32); the full set also has 512x512
  and 1536x496 scans, absent from the sample, so they get small guessed shares. The mix used is in
  `SIZES`: 512x496 70%, 768x496 24%, 512x512 3%, 1536x496 3%;
- a dark, speckled background (about 25 grey levels in the vitreous at the top, fading to about 10
  at the bottom), a bright RPE that often saturates, and on about half of the 512-wide scans a
  white (255) wedge along the top or bottom edge where the real device rotated the scan;
- speckle: multiplicative gamma speckle in linear intensity, which the log-like display turns into
  dark-skewed noise growing with the signal (about 6 grey levels of spread in the background, 20
  on bright layers, neighbour correlation about 0.6, as measured on the sample). For speed each
  process makes one large speckle field per seed and every scan takes a random window of it;
- noise strength is tuned so the median file size matches the sample's (about 43 KB; per size
  the synthetic medians are about 43 KB at 512x496 and 65 KB at 768x496, real 40 KB and 71 KB).

Counts: `n=None` gives the real counts (train CNV 37,205, DME 11,348, DRUSEN 8,616, NORMAL 26,315;
test and val 242 and 8 per class). A smaller `n` keeps the proportions: each of the 12 split/class
cells gets its largest-remainder (Hamilton) share of `n` with a floor of one image, so every cell
exists and the total is exactly `n` (which must be at least 12).

Patients: 7-digit ids, unique across the whole set (so no patient is in two splits or classes);
scans per patient are geometric with mean 20 in train and 1.6 in test and val (the real test split
has 1,000 scans of 633 patients), numbered `-1, -2, ...` with occasional gaps as in the real names.
Scans of one patient share the eye's geometry (size, thickness, tilt, fovea) and differ in detail.

Determinism: for a given `seed` and `n` the file list and every file's bytes are fixed; image bytes
depend only on the seed and the image's (split, class, index) entry in that list, never on the
number of workers or the order in which they run.

Resuming: images are written to `NAME.tmp` and renamed into place, so a file that exists with a
nonzero size is complete; an interrupted run, re-run with the same settings, keeps those files
(they are byte-identical to what it would write) and makes the rest.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "test", "val")
CLASSES: tuple[str, ...] = ("CNV", "DME", "DRUSEN", "NORMAL")
REAL_COUNTS: dict[str, dict[str, int]] = {
    "train": {"CNV": 37205, "DME": 11348, "DRUSEN": 8616, "NORMAL": 26315},
    "test": {"CNV": 242, "DME": 242, "DRUSEN": 242, "NORMAL": 242},
    "val": {"CNV": 8, "DME": 8, "DRUSEN": 8, "NORMAL": 8},
}
REAL_TOTAL = sum(sum(row.values()) for row in REAL_COUNTS.values())
JPEG_QUALITY = 75
MANIFEST_NAME = "manifest.csv"
SETTINGS_NAME = "generator.json"
MANIFEST_FIELDS: tuple[str, ...] = ("split", "class", "file", "patient_id", "width", "height", "bytes")
MEAN_SCANS_PER_PATIENT: dict[str, float] = {"train": 20.0, "test": 1.6, "val": 1.6}


@dataclass(frozen=True, slots=True)
class ScanSize:
    """One image size of the real set and its share of the synthetic one."""

    width: int
    height: int
    share: float
    """Fraction of scans with this size."""
    x_scale: float
    """Horizontal pixels per pixel of a 512-wide scan (anatomy is stretched by this much)."""


SIZES: tuple[ScanSize, ...] = (
    ScanSize(512, 496, 0.70, 1.0),
    ScanSize(768, 496, 0.24, 1.0),
    ScanSize(512, 512, 0.03, 1.0),
    ScanSize(1536, 496, 0.03, 3.0),
)

# Rendering constants (pixels of the full-resolution image unless stated).
_LOW_RES_X = 4  # the clean anatomy is drawn at 1/4 width and 1/2 height, then upsampled
_LOW_RES_Y = 2
_ILM_HALO = 6.0  # vitreous-to-retina transition above the inner limiting membrane
_CHOROID_SCALE = 40.0  # depth (px) per profile unit below Bruch's membrane
_LUT_STEPS = 128  # profile look-up entries per unit of the layer coordinate
_U_MIN, _U_MAX = -1.0, 9.0
_SPECKLE_BANK_SHAPE = (1024, 3072)  # (rows, cols); must exceed the largest image
_SPECKLE_LOOKS = 2.2  # gamma shape of the speckle before smoothing
_SPECKLE_RELATIVE = 0.09  # noise spread per unit of signal (see _banks)
_SPECKLE_FLOOR = 6.6  # noise spread at zero signal
_BANK_TAG = 0x5EC1
_PATIENT_TAG = 0xA11
_SCAN_TAG = 0x5CA
_PLAN_TAG = 0x9A


# ----------------------------------------------------------------------------------------------
# The plan: which files exist, with which patients


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One image of the data set: where it goes and whose scan it is."""

    split: str
    label: str
    index: int
    """Position of the image in its split/class cell (files sorted by patient, then scan)."""
    patient_id: int
    scan: int

    @property
    def file(self) -> str:
        """The file name, `CLASS-PATIENT-N.jpeg` as in the real release."""
        return f"{self.label}-{self.patient_id}-{self.scan}.jpeg"

    @property
    def relpath(self) -> str:
        """Path relative to the data set root."""
        return f"{self.split}/{self.label}/{self.file}"


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One written (or already present) image, as listed in `manifest.csv`."""

    split: str
    label: str
    file: str
    patient_id: int
    width: int
    height: int
    bytes: int
    generated: bool
    """False when the file was already there from an earlier run and was kept."""


@dataclass(frozen=True, slots=True)
class GenerateSummary:
    """What `generate_dataset` made."""

    out: Path
    counts: dict[str, dict[str, int]]
    """Images per split and class."""
    total_images: int
    generated: int
    """Images written by this run."""
    skipped: int
    """Images kept from an earlier, interrupted run."""
    total_bytes: int
    seconds: float
    workers: int
    sizes: dict[str, int] = field(default_factory=dict)
    """Images per `WIDTHxHEIGHT`."""

    @property
    def images_per_second(self) -> float:
        """Rate of this run over the images it wrote (kept files excluded)."""
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def split_counts(n: int | None = None) -> dict[str, dict[str, int]]:
    """Images per split and class: the real counts for `n=None`, else proportional shares of `n`.

    Each of the 12 cells gets its largest-remainder share of `n` with a floor of one, so the total
    is exactly `n`.
    """
    if n is None:
        return {split: dict(row) for split, row in REAL_COUNTS.items()}
    cells = [(split, label) for split in SPLITS for label in CLASSES]
    if n < len(cells):
        raise ValueError(f"n={n} is too small: every split/class needs an image, so use n >= {len(cells)}")
    quotas = [n * REAL_COUNTS[s][c] / REAL_TOTAL for s, c in cells]
    counts = [max(1, math.floor(q)) for q in quotas]
    cells_idx = range(len(cells))
    # Largest remainder: hand the missing images one by one to the most under-served cell; if the
    # floor of one overshot instead, take them back from the most over-served cell above one.
    while sum(counts) < n:
        counts[min(cells_idx, key=lambda i: (counts[i] - quotas[i], i))] += 1
    while sum(counts) > n:
        counts[max((i for i in cells_idx if counts[i] > 1), key=lambda i: (counts[i] - quotas[i], -i))] -= 1
    result: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for (split, label), count in zip(cells, counts, strict=True):
        result[split][label] = count
    return result


def plan_dataset(n: int | None = None, seed: int = 0) -> list[ImageSpec]:
    """Every image of the data set, in manifest order (split, class, patient, scan).

    Deterministic for `(n, seed)`. Patient ids are 7-digit and unique over the whole set.
    """
    counts = split_counts(n)
    total = sum(sum(row.values()) for row in counts.values())
    rng = np.random.default_rng([seed, _PLAN_TAG])
    # At most one patient per image, so `total` distinct ids always suffice.
    ids = iter((rng.choice(9_000_000, size=total, replace=False) + 1_000_000).tolist())
    specs: list[ImageSpec] = []
    for split in SPLITS:
        mean = MEAN_SCANS_PER_PATIENT[split]
        for label in CLASSES:
            scans: list[tuple[int, int]] = []
            remaining = counts[split][label]
            while remaining > 0:
                patient = next(ids)
                k = min(remaining, int(rng.geometric(1.0 / mean)))
                gaps = int(rng.poisson(0.15 * k))
                numbers = np.sort(rng.choice(k + gaps, size=k, replace=False)) + 1
                scans.extend((patient, int(num)) for num in numbers)
                remaining -= k
            scans.sort()
            specs.extend(ImageSpec(split, label, i, p, s) for i, (p, s) in enumerate(scans))
    return specs


# ----------------------------------------------------------------------------------------------
# Anatomy: one eye's geometry, as column profiles of layer boundaries


@dataclass(slots=True)
class _Bumps:
    """A sum of Gaussian bumps along x: sum_k height_k * exp(-((x - centre_k) / width_k)^2 / 2)."""

    centre: np.ndarray
    height: np.ndarray
    width: np.ndarray

    @classmethod
    def empty(cls) -> _Bumps:
        zero = np.zeros(0, dtype=np.float32)
        return cls(zero, zero, zero)

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        if self.centre.size == 0:
            return np.zeros_like(xs)
        z = (xs[None, :] - self.centre[:, None]) / self.width[:, None]
        return (self.height[:, None] * np.exp(-0.5 * z * z)).sum(axis=0).astype(np.float32)


@dataclass(slots=True)
class _Ellipses:
    """Dark (fluid) or bright (exudate) blobs placed inside the retina."""

    cx: np.ndarray
    depth: np.ndarray
    """Vertical position as a fraction of the ILM-to-photoreceptor thickness at cx."""
    rx: np.ndarray
    ry: np.ndarray
    level: np.ndarray
    """Signal inside the blob, above the noise floor."""


@dataclass(slots=True)
class _Anatomy:
    """Geometry and reflectivity of one scan."""

    width: int
    height: int
    bm_level: float
    tilt: float
    bend: float
    wobble: _Bumps
    fovea_x: float
    pit_sigma: float
    pit_depth: float
    inner0: float
    outer0: float
    rnfl_side: float
    rnfl_gain: float
    thickening: _Bumps
    lesion: _Bumps
    lift: _Bumps
    """How far the inner retina rises over a sub-RPE lesion (a smoother, lower copy of it)."""
    srf: _Bumps
    rpe_thickness: float
    blobs: _Ellipses
    vessels: _Bumps
    drift: _Bumps
    """Slow sideways change of retinal reflectivity (relative)."""
    bg_top: float
    bg_bottom: float
    gain: float
    lesion_fill: tuple[float, float, float]
    lesion_texture: float
    lesion_shadow: float
    wedge_top: tuple[float, float] | None
    wedge_bottom: tuple[float, float] | None

    def boundaries(self, xs: np.ndarray) -> np.ndarray:
        """Layer boundaries (7, len(xs)), top to bottom, increasing down each column.

        Rows: ILM halo start, ILM, end of the inner retina, end of the photoreceptors, RPE top,
        RPE bottom, Bruch's membrane. Regions between them: vitreous halo, inner retina, outer
        retina, subretinal fluid, RPE, sub-RPE lesion (drusen or CNV), then the choroid.
        """
        centred = (xs - self.width / 2) / (self.width / 2)
        bm = self.bm_level + self.tilt * (xs - self.width / 2) - self.bend * centred * centred + self.wobble(xs)
        dx = xs - self.fovea_x
        pit = np.exp(-0.5 * (dx / self.pit_sigma) ** 2)
        rim = np.exp(-0.5 * (dx / (2.6 * self.pit_sigma)) ** 2)
        swell = self.thickening(xs)
        nasal = 1.0 / (1.0 + np.exp(-self.rnfl_side * dx / (1.5 * self.pit_sigma)))
        inner = self.inner0 * (1.0 + 0.15 * rim + self.rnfl_gain * nasal + 0.5 * swell) * (1.0 - self.pit_depth * pit)
        outer = self.outer0 * (1.0 + 0.2 * pit + swell)
        lesion = np.maximum(self.lesion(xs), 0.0)
        lift = np.maximum(self.lift(xs), 0.0)
        srf = np.maximum(self.srf(xs), 0.0)
        rpe_end = bm - lesion
        rpe_top = rpe_end - self.rpe_thickness
        photo_end = rpe_top - srf
        # The photoreceptors are squeezed over a lesion; the inner retina only rises by `lift`.
        inner_end = np.minimum(bm - self.rpe_thickness - srf - lift - outer, photo_end - 0.3 * outer)
        ilm = inner_end - np.maximum(inner, 0.5)
        # Keep the retina inside the frame: push the whole eye down if the ILM leaves the top.
        shift = max(0.0, 0.06 * self.height - float(ilm.min()))
        rows = np.stack([ilm - _ILM_HALO, ilm, inner_end, photo_end, rpe_top, rpe_end, bm]) + shift
        return rows.astype(np.float32)

    def background(self, ys: np.ndarray | float) -> np.ndarray:
        """Noise-floor level by depth: brighter vitreous at the top, darker sclera at the bottom."""
        depth = np.asarray(ys, dtype=np.float32) / self.height
        return np.asarray(self.bg_top + (self.bg_bottom - self.bg_top) * depth, dtype=np.float32)

    def profile_lut(self) -> np.ndarray:
        """Signal above the noise floor as a function of the layer coordinate u (1/_LUT_STEPS apart)."""
        fill_top, fill_mid, fill_bottom = self.lesion_fill
        knots = [
            (-1.0, 0.0),
            (-0.02, 10.0),
            (0.0, 175.0),  # ILM / nerve fibre layer
            (0.15, 140.0),
            (0.24, 85.0),  # ganglion cells
            (0.42, 110.0),  # inner plexiform
            (0.58, 100.0),
            (0.64, 45.0),  # inner nuclear (dark)
            (0.8, 48.0),
            (0.86, 108.0),  # outer plexiform
            (0.97, 90.0),
            (1.0, 65.0),
            (1.06, 32.0),  # outer nuclear (dark, thick)
            (1.7, 32.0),
            (1.74, 80.0),  # external limiting membrane
            (1.78, 45.0),
            (1.86, 185.0),  # ellipsoid zone
            (1.9, 95.0),
            (1.96, 140.0),  # interdigitation zone
            (2.0, 80.0),
            (2.08, 3.0),  # subretinal fluid (only where present)
            (2.92, 3.0),
            (3.0, 200.0),  # RPE
            (3.4, 235.0),
            (3.8, 225.0),
            (4.0, fill_top),  # sub-RPE material (drusen / CNV; only where present)
            (4.5, fill_mid),
            (5.0, fill_bottom),
            (5.05, 150.0),  # Bruch's membrane / choriocapillaris
            (5.2, 65.0),
            (5.6, 50.0),
            (6.2, 28.0),  # choroid fading with depth
            (6.9, 10.0),
            (7.6, 0.0),
        ]
        u = np.linspace(_U_MIN, _U_MAX, int((_U_MAX - _U_MIN) * _LUT_STEPS) + 1, dtype=np.float32)
        ku = np.array([k for k, _ in knots], dtype=np.float32)
        kv = np.array([v for _, v in knots], dtype=np.float32)
        return (self.gain * np.interp(u, ku, kv)).astype(np.float32)


def _uniform(rng: np.random.Generator, low: float, high: float, size: int | None = None) -> np.ndarray:
    return rng.uniform(low, high, size).astype(np.float32)


def _draw_anatomy(label: str, patient: np.random.Generator, scan: np.random.Generator) -> _Anatomy:
    """Draw one scan's anatomy: eye-level traits from `patient`, scan-level detail from `scan`."""
    # Eye-level traits, shared by every scan of a patient.
    size = SIZES[int(patient.choice(len(SIZES), p=[s.share for s in SIZES]))]
    if scan.random() < 0.15:  # now and then a patient was scanned with another protocol
        size = SIZES[int(scan.choice(len(SIZES), p=[s.share for s in SIZES]))]
    width, height, xs = size.width, size.height, size.x_scale
    bm_frac = float(patient.uniform(0.4, 0.62))
    tilt = float(patient.uniform(-0.12, 0.12)) / xs
    bend = float(patient.uniform(-15.0, 50.0))
    fovea_frac = float(patient.uniform(0.38, 0.62))
    inner0 = float(patient.uniform(32.0, 46.0))
    outer0 = float(patient.uniform(30.0, 40.0))
    rnfl_side = float(patient.choice([-1.0, 1.0]))
    bg_top = float(patient.uniform(18.0, 32.0))
    bg_bottom = float(patient.uniform(6.0, 14.0))
    gain = float(patient.uniform(0.7, 1.05))
    severity = float(patient.uniform(0.6, 1.0))

    # Scan-level detail.
    bm_level = height * (bm_frac + float(scan.uniform(-0.03, 0.03)))
    fovea_x = width * (fovea_frac + float(scan.uniform(-0.04, 0.04)))
    pit_sigma = float(scan.uniform(24.0, 36.0)) * xs
    pit_depth = float(scan.uniform(0.8, 0.97))
    n_wobble = 2
    wobble = _Bumps(
        centre=_uniform(scan, 0, width, n_wobble),
        height=_uniform(scan, -5.0, 5.0, n_wobble),
        width=_uniform(scan, 40.0, 120.0, n_wobble) * xs,
    )
    n_vessels = int(scan.integers(1, 6))
    vessels = _Bumps(
        centre=_uniform(scan, 0, width, n_vessels),
        height=_uniform(scan, 0.12, 0.4, n_vessels),
        width=_uniform(scan, 3.5, 6.0, n_vessels) * xs,
    )
    n_drift = 3
    drift = _Bumps(
        centre=_uniform(scan, 0, width, n_drift),
        height=_uniform(scan, -0.15, 0.15, n_drift),
        width=_uniform(scan, 50.0, 150.0, n_drift) * xs,
    )
    anatomy = _Anatomy(
        width=width,
        height=height,
        bm_level=bm_level,
        tilt=tilt + float(scan.uniform(-0.02, 0.02)),
        bend=bend,
        wobble=wobble,
        fovea_x=fovea_x,
        pit_sigma=pit_sigma,
        pit_depth=pit_depth,
        inner0=inner0,
        outer0=outer0,
        rnfl_side=rnfl_side,
        rnfl_gain=float(scan.uniform(0.0, 0.3)),
        thickening=_Bumps.empty(),
        lesion=_Bumps.empty(),
        lift=_Bumps.empty(),
        srf=_Bumps.empty(),
        rpe_thickness=float(scan.uniform(5.0, 7.0)),
        blobs=_Ellipses(*(np.zeros(0, dtype=np.float32) for _ in range(5))),
        vessels=vessels,
        drift=drift,
        bg_top=bg_top,
        bg_bottom=bg_bottom,
        gain=gain,
        lesion_fill=(110.0, 95.0, 110.0),
        lesion_texture=0.0,
        lesion_shadow=0.0,
        wedge_top=None,
        wedge_bottom=None,
    )
    _add_pathology(anatomy, label, scan, severity, xs)
    if width == 512 and scan.random() < 0.55:  # the device's rotation leaves white corners
        high = float(scan.uniform(15.0, 70.0))
        low = float(scan.uniform(0.0, 12.0))
        anatomy.wedge_top = (high, low) if scan.random() < 0.5 else (low, high)
        if scan.random() < 0.35:
            anatomy.wedge_bottom = (float(scan.uniform(0.0, 8.0)), float(scan.uniform(5.0, 30.0)))
    return anatomy


def _add_pathology(a: _Anatomy, label: str, rng: np.random.Generator, severity: float, xs: float) -> None:
    """Add the class's lesion to a healthy anatomy (NORMAL stays as it is)."""
    if label == "DRUSEN":
        # Dome-shaped RPE elevations near the fovea, filled with moderately bright material.
        k = int(rng.integers(2, 8))
        a.lesion = _Bumps(
            centre=a.fovea_x + _uniform(rng, -3.2, 3.2, k) * a.pit_sigma,
            height=_uniform(rng, 7.0, 20.0, k) * severity,
            width=_uniform(rng, 6.0, 15.0, k) * xs,
        )
        a.lift = _Bumps(a.lesion.centre, 0.4 * a.lesion.height, 1.8 * a.lesion.width)
        a.lesion_fill = (95.0, 70.0, 85.0)
        a.lesion_texture = 0.15
    elif label == "DME":
        # Thickened retina, blunted pit, dark intraretinal cysts, a few bright exudates.
        centre = a.fovea_x + float(rng.uniform(-1.0, 1.0)) * a.pit_sigma
        a.thickening = _Bumps(
            centre=np.array([centre], dtype=np.float32),
            height=np.array([rng.uniform(0.35, 0.95) * severity], dtype=np.float32),
            width=np.array([rng.uniform(55.0, 110.0) * xs], dtype=np.float32),
        )
        a.pit_depth *= float(rng.uniform(0.1, 0.6))
        n_cysts = int(rng.integers(2, 10))
        n_foci = int(rng.integers(0, 6))
        k = n_cysts + n_foci
        cyst = np.arange(k) < n_cysts
        spread = float(a.thickening.width[0])
        a.blobs = _Ellipses(
            cx=(centre + _uniform(rng, -1.1, 1.1, k) * spread).astype(np.float32),
            depth=np.where(cyst, _uniform(rng, 0.35, 0.75, k), _uniform(rng, 0.5, 0.62, k)).astype(np.float32),
            rx=np.where(cyst, _uniform(rng, 5.0, 24.0, k) * xs, _uniform(rng, 2.5, 4.5, k)).astype(np.float32),
            ry=np.where(cyst, _uniform(rng, 5.0, 20.0, k), _uniform(rng, 2.0, 3.5, k)).astype(np.float32),
            level=np.where(cyst, 3.0, 115.0).astype(np.float32),
        )
    elif label == "CNV":
        # Irregular, bright fibrovascular RPE elevation with subretinal fluid beside it.
        centre = a.fovea_x + float(rng.uniform(-1.5, 1.5)) * a.pit_sigma
        main_height = float(rng.uniform(18.0, 50.0)) * severity
        main_width = float(rng.uniform(22.0, 55.0)) * xs
        k = int(rng.integers(5, 12))
        a.lesion = _Bumps(
            centre=np.concatenate([[centre], centre + _uniform(rng, -1.4, 1.4, k) * main_width]).astype(np.float32),
            height=np.concatenate([[main_height], _uniform(rng, -0.35, 0.45, k) * main_height]).astype(np.float32),
            width=np.concatenate([[main_width], _uniform(rng, 3.0, 10.0, k) * xs]).astype(np.float32),
        )
        a.lift = _Bumps(
            centre=np.array([centre], dtype=np.float32),
            height=np.array([0.8 * main_height], dtype=np.float32),
            width=np.array([1.4 * main_width], dtype=np.float32),
        )
        if rng.random() < 0.85:
            side = float(rng.choice([-1.0, 1.0]))
            a.srf = _Bumps(
                centre=np.array([centre + side * rng.uniform(0.6, 1.6) * main_width], dtype=np.float32),
                height=np.array([rng.uniform(8.0, 28.0) * severity], dtype=np.float32),
                width=np.array([rng.uniform(14.0, 40.0) * xs], dtype=np.float32),
            )
        a.thickening = _Bumps(
            centre=np.array([centre], dtype=np.float32),
            height=np.array([rng.uniform(0.1, 0.4)], dtype=np.float32),
            width=np.array([main_width * 1.5], dtype=np.float32),
        )
        a.pit_depth *= float(rng.uniform(0.2, 0.8))
        a.rpe_thickness *= float(rng.uniform(1.2, 1.8))
        a.lesion_fill = (200.0, 150.0, 170.0)
        a.lesion_texture = 0.6
        a.lesion_shadow = 0.55
        if rng.random() < 0.3:
            k = int(rng.integers(1, 4))
            a.blobs = _Ellipses(
                cx=(centre + _uniform(rng, -1.2, 1.2, k) * main_width).astype(np.float32),
                depth=_uniform(rng, 0.45, 0.75, k),
                rx=_uniform(rng, 5.0, 16.0, k) * xs,
                ry=_uniform(rng, 4.0, 12.0, k),
                level=np.full(k, 3.0, dtype=np.float32),
            )


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True, slots=True)
class _Banks:
    """Random fields made once per process and seed; each scan takes windows of them."""

    speckle_gain: np.ndarray
    speckle_offset: np.ndarray
    texture: np.ndarray
    """Smooth field in [0, 1) at the low resolution (choroidal vessels, lesion texture)."""

    def window(self, field: np.ndarray, rng: np.random.Generator, rows: int, cols: int) -> tuple[slice, slice]:
        """A random window of `field` of the given shape."""
        oy = int(rng.integers(0, field.shape[0] - rows + 1))
        ox = int(rng.integers(0, field.shape[1] - cols + 1))
        return slice(oy, oy + rows), slice(ox, ox + cols)


@functools.lru_cache(maxsize=2)
def _banks(seed: int) -> _Banks:
    """Make the speckle and texture fields for `seed`.

    Speckle is multiplicative (gamma-distributed) in linear OCT intensity; the log-like display
    turns it into additive, dark-skewed noise whose spread grows with the signal. So a window `n`
    of log-speckle (zero mean, unit spread) is applied as `clean * (1 + a * n) + b * n`, fitted to
    the real sample's noise (about 6 grey levels in the background, 20 on bright layers). The
    field is smoothed over about two pixels, a little more vertically, so its grain (neighbour
    correlation about 0.55 across, 0.65 down) and JPEG cost match the real scans.
    """
    rng = np.random.default_rng([seed, _BANK_TAG])
    rows, cols = _SPECKLE_BANK_SHAPE
    g = rng.standard_gamma(_SPECKLE_LOOKS, size=(rows + 2, cols + 2), dtype=np.float32)
    g = 0.25 * g[:-2] + 0.5 * g[1:-1] + 0.25 * g[2:]
    g = 0.2 * g[:, :-2] + 0.6 * g[:, 1:-1] + 0.2 * g[:, 2:]
    n = np.log(g)
    n -= n.mean()
    n /= n.std()
    # Texture: white noise blurred to blobs of about 15x20 pixels (no lattice, unlike grid noise).
    t = _box_blur(rng.random((rows // _LOW_RES_Y, cols // _LOW_RES_X), dtype=np.float32), (3, 2))
    t = np.clip((t - t.mean()) / (4.0 * t.std()) + 0.5, 0.0, 1.0)
    return _Banks(
        speckle_gain=np.ascontiguousarray(1.0 + _SPECKLE_RELATIVE * n),
        speckle_offset=np.ascontiguousarray(_SPECKLE_FLOOR * n),
        texture=np.ascontiguousarray(t),
    )


def _box_blur(field: np.ndarray, radius: tuple[int, int], passes: int = 3) -> np.ndarray:
    """Approximately Gaussian blur: `passes` box filters of half-width `radius` per axis (wrapping)."""
    out = field.astype(np.float64)
    for axis, r in enumerate(radius):
        for _ in range(passes):
            padded = np.concatenate(
                [np.take(out, range(-r - 1, 0), axis=axis), out, np.take(out, range(r), axis=axis)], axis=axis
            )
            summed = np.cumsum(padded, axis=axis)
            n = out.shape[axis]
            out = (
                np.take(summed, range(2 * r + 1, 2 * r + 1 + n), axis=axis) - np.take(summed, range(n), axis=axis)
            ) / (2 * r + 1)
    return out.astype(np.float32)


def _layer_coordinate(bounds: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The layer coordinate u for every (row, column): u = k - 1 + fraction through region k.

    -1 above the ILM halo, 0..1 inner retina, 1..2 outer retina, 2..3 subretinal fluid, 3..4 RPE,
    4..5 sub-RPE lesion, then 5 + depth / _CHOROID_SCALE below Bruch's membrane (at most 9).
    """
    inv_spans = 1.0 / np.maximum(np.diff(bounds, axis=0), 1e-3)
    rows = ys[:, None]
    u = np.full((ys.size, bounds.shape[1]), -1.0, dtype=np.float32)
    part = np.empty_like(u)
    for k in range(bounds.shape[0] - 1):
        np.subtract(rows, bounds[k], out=part)
        part *= inv_spans[k]
        np.clip(part, 0.0, 1.0, out=part)
        u += part
    np.subtract(rows, bounds[-1], out=part)
    part *= 1.0 / _CHOROID_SCALE
    np.clip(part, 0.0, _U_MAX - 5.0, out=part)
    u += part
    return u


def _render_clean_low(a: _Anatomy, rng: np.random.Generator, banks: _Banks) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free scan at 1/_LOW_RES_X width and 1/_LOW_RES_Y height, and its boundaries there."""
    h, w = a.height // _LOW_RES_Y, a.width // _LOW_RES_X
    xs = (np.arange(w, dtype=np.float32) + 0.5) * _LOW_RES_X
    ys = (np.arange(h, dtype=np.float32) + 0.5) * _LOW_RES_Y
    bounds = a.boundaries(xs)
    u = _layer_coordinate(bounds, ys)
    lut = a.profile_lut()
    clean = lut[((u - _U_MIN) * _LUT_STEPS).astype(np.intp)]

    # Choroid: blotchy vessels and vertical streaks, darker under a CNV lesion.
    texture = banks.texture[banks.window(banks.texture, rng, h, w)]
    streaks = banks.texture[banks.window(banks.texture, rng, 1, w)][0]
    column = 0.8 + 0.4 * streaks
    if a.lesion_shadow > 0.0:
        column *= 1.0 - a.lesion_shadow * np.clip((bounds[6] - bounds[5]) / 20.0, 0.0, 1.0)
    deep = np.clip((u - 5.1) * 3.0, 0.0, 1.0)
    clean *= 1.0 + deep * ((0.2 + 1.6 * texture) * column[None, :] - 1.0)
    if a.lesion_texture > 0.0:
        in_lesion = (u >= 4.0) & (u < 5.0)
        clean[in_lesion] *= 1.0 + a.lesion_texture * (2.0 * texture[in_lesion] - 1.0)
    # Retinal vessels shadow everything below the nerve fibre layer; reflectivity drifts sideways.
    shadow = (1.0 - np.minimum(a.vessels(xs), 0.8)) * (1.0 + a.drift(xs))
    below_nfl = np.clip((u - 0.2) * 4.0, 0.0, 1.0)
    clean *= 1.0 + below_nfl * (shadow[None, :] - 1.0)
    clean += a.background(ys)[:, None]
    return clean, bounds


def _upsample(low: np.ndarray) -> np.ndarray:
    """Bilinear upsampling by (_LOW_RES_Y, _LOW_RES_X) = (2, 4), pixel centres aligned, edges held."""
    h, w = low.shape
    tall = np.empty((2 * h, w), dtype=np.float32)
    tall[0] = low[0]
    tall[2::2] = 0.75 * low[1:] + 0.25 * low[:-1]
    tall[1:-1:2] = 0.75 * low[:-1] + 0.25 * low[1:]
    tall[-1] = low[-1]
    left = np.concatenate([tall[:, :1], tall[:, :-1]], axis=1)
    right = np.concatenate([tall[:, 1:], tall[:, -1:]], axis=1)
    out = np.empty((2 * h, w, 4), dtype=np.float32)
    out[:, :, 0] = 0.625 * tall + 0.375 * left
    out[:, :, 1] = 0.875 * tall + 0.125 * left
    out[:, :, 2] = 0.875 * tall + 0.125 * right
    out[:, :, 3] = 0.625 * tall + 0.375 * right
    return out.reshape(2 * h, 4 * w)


def _stamp_blobs(image: np.ndarray, a: _Anatomy, bounds_low: np.ndarray) -> None:
    """Draw cysts and exudates into the full-resolution clean image, in place."""
    blobs = a.blobs
    if blobs.cx.size == 0:
        return
    xs_low = (np.arange(bounds_low.shape[1], dtype=np.float32) + 0.5) * _LOW_RES_X
    height, width = image.shape
    for cx, depth, rx, ry, level in zip(blobs.cx, blobs.depth, blobs.rx, blobs.ry, blobs.level, strict=True):
        ilm = float(np.interp(cx, xs_low, bounds_low[1]))
        photo_end = float(np.interp(cx, xs_low, bounds_low[3]))
        thickness = photo_end - ilm
        ry_fit = min(float(ry), 0.3 * thickness)  # a cyst never pokes out of the retina
        if ry_fit < 1.0:
            continue
        cy = ilm + float(depth) * thickness
        target = float(level) + float(a.background(cy))
        x0, x1 = max(int(cx - rx - 1), 0), min(int(cx + rx + 2), width)
        y0, y1 = max(int(cy - ry_fit - 1), 0), min(int(cy + ry_fit + 2), height)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx
        gy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / ry_fit
        r2 = gy[:, None] ** 2 + gx[None, :] ** 2
        mask = np.clip((1.0 - r2) * 3.0, 0.0, 1.0)
        patch = image[y0:y1, x0:x1]
        patch += mask * (target - patch)


def render_scan(spec: ImageSpec, seed: int = 0) -> np.ndarray:
    """Draw one synthetic B-scan: a (height, width) uint8 array, fixed by `seed` and `spec`."""
    label_idx = CLASSES.index(spec.label)
    patient = np.random.default_rng([seed, _PATIENT_TAG, label_idx, spec.patient_id])
    scan = np.random.default_rng([seed, _SCAN_TAG, SPLITS.index(spec.split), label_idx, spec.index])
    a = _draw_anatomy(spec.label, patient, scan)
    banks = _banks(seed)
    clean_low, bounds_low = _render_clean_low(a, scan, banks)
    clean = _upsample(clean_low)
    _stamp_blobs(clean, a, bounds_low)
    window = banks.window(banks.speckle_gain, scan, a.height, a.width)
    clean *= banks.speckle_gain[window]
    clean += banks.speckle_offset[window]
    np.clip(clean, 0.0, 255.0, out=clean)
    pixels = clean.astype(np.uint8)
    if a.wedge_top is not None:
        _fill_wedge(pixels, a.wedge_top, top=True)
    if a.wedge_bottom is not None:
        _fill_wedge(pixels, a.wedge_bottom, top=False)
    return pixels


def _fill_wedge(pixels: np.ndarray, depths: tuple[float, float], *, top: bool) -> None:
    """Paint white the band between the top (or bottom) edge and a straight slanted line.

    `depths` is the band's depth in pixels at the left and the right edge.
    """
    height, width = pixels.shape
    left, right = depths
    reach = min(math.ceil(max(left, right)), height)
    if reach <= 0:
        return
    line = np.linspace(left, right, width, dtype=np.float32)
    depth = np.arange(reach, dtype=np.float32)[:, None] + 0.5
    band = pixels[:reach] if top else pixels[height - reach :][::-1]
    band[depth < line[None, :]] = 255


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Encode a uint8 grayscale image as a baseline JPEG like the real set's (quality 75)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Writing the data set


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _make_images(out: str, seed: int, specs: Sequence[ImageSpec]) -> list[ImageRecord]:
    """Worker task: write (or keep) each image of `specs` under `out`."""
    root = Path(out)
    records: list[ImageRecord] = []
    for spec in specs:
        path = root / spec.relpath
        try:
            existing = path.stat().st_size
        except FileNotFoundError:
            existing = 0
        if existing > 0:
            with Image.open(path) as image:
                width, height = image.size
            records.append(
                ImageRecord(spec.split, spec.label, spec.file, spec.patient_id, width, height, existing, False)
            )
            continue
        pixels = render_scan(spec, seed)
        data = encode_jpeg(pixels)
        _write_atomic(path, data)
        height, width = pixels.shape
        records.append(ImageRecord(spec.split, spec.label, spec.file, spec.patient_id, width, height, len(data), True))
    return records


def _chunks(specs: Sequence[ImageSpec], size: int) -> Iterator[Sequence[ImageSpec]]:
    for start in range(0, len(specs), size):
        yield specs[start : start + size]


class _Progress:
    """Images done and rate: a live line on a terminal, a log line every 10% otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.next_log = 0.1

    def update(self, done: int, made: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate = made / elapsed
        if self.live:
            if now - self.last_draw >= 0.25 or done == self.total:
                eta = (self.total - done) / rate if rate > 0 else float("nan")
                sys.stderr.write(f"\r  {done:,}/{self.total:,} images  {rate:,.0f} img/s  eta {eta:,.0f} s   ")
                sys.stderr.flush()
                self.last_draw = now
        elif done >= self.next_log * self.total:
            logger.info("generated %s/%s images (%.0f img/s)", done, self.total, rate)
            while self.next_log * self.total <= done:
                self.next_log += 0.1

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _check_settings(out: Path, n: int | None, seed: int) -> None:
    """Refuse to mix two data sets in one directory; record the settings for later runs."""
    settings = {"generator_version": GENERATOR_VERSION, "n": n, "seed": seed}
    path = out / SETTINGS_NAME
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != settings:
            raise ValueError(
                f"{out} holds a data set made with {previous}, not {settings}; "
                "re-run with those settings to resume it, or choose an empty --out directory"
            )
        return
    _write_atomic(path, (json.dumps(settings, indent=2) + "\n").encode())


def _write_manifest(out: Path, records: Sequence[ImageRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for r in records:
        writer.writerow((r.split, r.label, r.file, r.patient_id, r.width, r.height, r.bytes))
    tmp = out / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / MANIFEST_NAME)


def generate_dataset(
    out: Path,
    n: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> GenerateSummary:
    """Write the synthetic OCT data set under `out` and return what was made.

    Args:
        out: data set root; created if missing. Re-running into it with the same `n` and `seed`
            resumes an interrupted run; other settings are refused.
        n: total images; None for the real set's 84,484 (see `split_counts` for smaller n).
        seed: fixes every file name and every image's bytes.
        workers: processes; None for `os.cpu_count()`. 1 renders in this process.
        progress: show images done and the rate (a live line on a terminal, else log lines).
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers={workers}: use 1 or more (or leave it unset for one per CPU)")
    out = Path(out)
    specs = plan_dataset(n, seed)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, n, seed)
    for split in SPLITS:
        for label in CLASSES:
            cell = out / split / label
            cell.mkdir(parents=True, exist_ok=True)
            for stale in cell.glob("*.tmp"):  # half-written files of an interrupted run
                stale.unlink()
    logger.info("generating %s synthetic OCT images into %s with %s worker(s)", len(specs), out, workers)

    start = time.perf_counter()
    chunk_size = max(1, min(64, math.ceil(len(specs) / (4 * workers))))
    chunks = list(_chunks(specs, chunk_size))
    results: list[list[ImageRecord] | None] = [None] * len(chunks)
    bar = _Progress(len(specs), progress)
    done = made = 0
    try:
        if workers == 1:
            for i, chunk in enumerate(chunks):
                results[i] = _make_images(str(out), seed, chunk)
                done += len(chunk)
                made += sum(r.generated for r in results[i] or ())
                bar.update(done, made)
        else:
            context = multiprocessing.get_context("spawn")  # safe even if the caller holds threads
            pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context)
            finished_all = False
            try:
                pending: dict[Future[list[ImageRecord]], int] = {
                    pool.submit(_make_images, str(out), seed, chunk): i for i, chunk in enumerate(chunks)
                }
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        i = pending.pop(future)
                        records = future.result()
                        results[i] = records
                        done += len(records)
                        made += sum(r.generated for r in records)
                    bar.update(done, made)
                finished_all = True
            finally:
                # On an error or Ctrl-C, drop the queued chunks instead of waiting for all of them.
                pool.shutdown(wait=finished_all, cancel_futures=not finished_all)
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    records = [r for chunk_records in results for r in chunk_records or ()]
    _write_manifest(out, records)
    counts = {split: {label: 0 for label in CLASSES} for split in SPLITS}
    sizes: dict[str, int] = {}
    for r in records:
        counts[r.split][r.label] += 1
        key = f"{r.width}x{r.height}"
        sizes[key] = sizes.get(key, 0) + 1
    summary = GenerateSummary(
        out=out,
        counts=counts,
        total_images=len(records),
        generated=made,
        skipped=len(records) - made,
        total_bytes=sum(r.bytes for r in records),
        seconds=seconds,
        workers=workers,
        sizes=dict(sorted(sizes.items())),
    )
    logger.info(
        "wrote %s images (%s kept from an earlier run), %.1f MB, in %.1f s (%.0f img/s)",
        summary.generated,
        summary.skipped,
        summary.total_bytes / 1e6,
        summary.seconds,
        summary.images_per_second,
    )
    return summary


# ----------------------------------------------------------------------------------------------
# Command line: `embedserve bench generate` (or `python -m bench.generate`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the generator's options to `parser` (for mounting as a subcommand)."""
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="data set root to write")
    parser.add_argument(
        "--n", type=int, default=None, metavar="N", help=f"total images (default: the real {REAL_TOTAL:,})"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="fixes every image (default 0)")
    parser.add_argument("--workers", type=int, default=None, metavar="W", help="processes (default: one per CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """Run the generator from parsed arguments; returns a process exit code."""
    try:
        summary = generate_dataset(args.out, n=args.n, seed=args.seed, workers=args.workers, progress=not args.quiet)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    if not args.quiet:
        logger.info("images per size: %s", summary.sizes)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse `argv`, set up logging, generate."""
    parser = argparse.ArgumentParser(
        prog="embedserve bench generate",
        description="Write a synthetic twin of the Kermany 2018 OCT set (scores on it are not scores on real OCT).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
