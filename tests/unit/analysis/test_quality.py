"""On the 32 real OCT scans, Lite0 features separate the pathologies better than raw pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA


def hungarian_accuracy(truth: list[str], clusters: np.ndarray) -> float:
    classes = sorted(set(truth))
    t = np.array([classes.index(c) for c in truth])
    table = np.zeros((clusters.max() + 1, len(classes)), dtype=np.int64)
    np.add.at(table, (clusters, t), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(truth))


def test_hungarian_accuracy_on_a_hand_made_case() -> None:
    truth = ["a", "a", "a", "b", "b", "c"]
    clusters = np.array([2, 2, 0, 1, 1, 0])  # best map: 2->a (2), 1->b (2), 0->c (1)
    assert hungarian_accuracy(truth, clusters) == 5 / 6


def _kmeans_accuracy(features: np.ndarray, labels: list[str], seeds: int = 10) -> float:
    scores = [
        hungarian_accuracy(labels, KMeans(n_clusters=4, n_init=10, random_state=s).fit_predict(features))
        for s in range(seeds)
    ]
    return float(np.mean(scores))


def test_lite0_beats_raw_pixels_on_real_oct(
    oct_embeddings: np.ndarray, oct_files: list[Path], oct_labels: list[str]
) -> None:
    raw = np.stack(
        [
            np.asarray(Image.open(f).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float32).ravel() / 255
            for f in oct_files
        ]
    )
    raw = PCA(n_components=16, random_state=0).fit_transform(raw)
    raw_acc = _kmeans_accuracy(raw, oct_labels)
    lite_acc = _kmeans_accuracy(oct_embeddings, oct_labels)
    print(f"k-means (k=4) Hungarian accuracy on 32 real OCT scans: Lite0 {lite_acc:.3f}, raw pixels {raw_acc:.3f}")
    assert lite_acc > raw_acc + 0.05
    assert lite_acc >= 0.40
