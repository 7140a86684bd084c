"""On the 32 real OCT scans: K-means on Lite0 embeddings beats raw pixels; the linear probe beats chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.analysis import evaluate as ev
from service.analysis.cluster import ClusterParams, cluster

SEEDS = range(10)


def _mean_scores(features: np.ndarray, labels: list[str]) -> tuple[float, float]:
    runs = [cluster(features, ClusterParams(k=4, n_init=10, seed=s, backend="sklearn"), truth=labels) for s in SEEDS]
    return float(np.mean([r.metrics["accuracy"] for r in runs])), float(np.mean([r.metrics["nmi"] for r in runs]))


def test_kmeans_on_lite0_beats_raw_pixels(
    oct_embeddings: np.ndarray, oct_files: list[Path], oct_labels: list[str]
) -> None:
    raw = ev.raw_pixel_features(oct_files, size=64, pca_dim=16)
    raw_acc, raw_nmi = _mean_scores(raw, oct_labels)
    lite_acc, lite_nmi = _mean_scores(oct_embeddings, oct_labels)
    print(
        f"\nOCT n=32, k-means k=4, mean of {len(SEEDS)} seeds: Lite0 accuracy {lite_acc:.3f} NMI {lite_nmi:.3f}; "
        f"raw pixels accuracy {raw_acc:.3f} NMI {raw_nmi:.3f}"
    )
    assert lite_acc > raw_acc + 0.05
    assert lite_nmi > raw_nmi + 0.05


def test_linear_probe_beats_chance_grouped_by_patient(
    oct_embeddings: np.ndarray, oct_files: list[Path], oct_labels: list[str]
) -> None:
    patients = [f.stem.split("-")[1] for f in oct_files]
    lin = ev.run_probe(oct_embeddings, oct_labels, classifier="logreg", groups=patients, group_name="patient", folds=4)
    knn = ev.run_probe(oct_embeddings, oct_labels, classifier="knn", groups=patients, group_name="patient", folds=4)
    print(f"\nOCT n=32 probes grouped by patient ({lin.folds} folds):\n{lin.format()}\n{knn.format()}")
    assert lin.chance == 0.25
    assert lin.accuracy >= 0.5
