"""Defaults of the density algorithms (DBSCAN, HDBSCAN, OPTICS) that scale with the data, the robust knee of the
k-distance curve, and the warnings of a degenerate result.

Rules (n items of dimension d; every default applies only when the parameter is unset):

| parameter          | default                                   | 32 items | 1,000 | 84,484 |
|--------------------|-------------------------------------------|----------|-------|--------|
| `min_samples`      | max(3, round(ln n))                       | 3        | 7     | 11     |
| `min_cluster_size` | max(min_samples, round(sqrt(n) / 2))      | 3        | 16    | 145    |
| `metric`           | cosine (rows L2-normalised, then euclidean: sqrt(2 - 2 cos)) |  |  |  |
| `pca_dim`          | ceil(n / 4) clipped to 2..50 when d > n, else none | 8 (d=1280) | 50 (d=1280) | none |
| `eps` (DBSCAN)     | robust knee of the k-distance curve for min_samples (see `robust_knee_candidates`) | | | |

A result is degenerate when it has at most one cluster or more than 80 % noise; it then carries a warning that
names the parameter to move and quotes the k-distance curve.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from service.errors import ConfigError
from service.types import NOISE, ClusterParams


def knee(curve: np.ndarray) -> float:
    """The value at the knee of an ascending curve: the point farthest below the chord from its first to last point."""
    y = np.asarray(curve, dtype=np.float64)
    if y.size == 0:
        raise ConfigError("cannot find a knee in an empty curve")
    if y[-1] <= y[0]:
        return float(y[-1])
    xs = np.linspace(0.0, 1.0, y.size)
    yn = (y - y[0]) / (y[-1] - y[0])
    return float(y[int(np.argmax(xs - yn))])


DENSITY_ALGORITHMS = frozenset({"dbscan", "hdbscan", "optics"})
DEFAULT_N_INIT = 4
"""K-means restarts when `n_init` is unset."""
AUTO_PCA_MAX_DIM = 50
"""Automatic PCA (density algorithms, d > n) keeps ceil(n / 4) components, between 2 and this many."""
DEGENERATE_NOISE_FRACTION = 0.8
"""A density clustering that leaves more than this share of the items as noise is reported as degenerate."""


def default_min_samples(n: int) -> int:
    """Core-point neighbourhood for n items: max(3, round(ln n)), at most n (32 items: 3; 1,000: 7; 84k: 11)."""
    return min(n, max(3, round(math.log(max(n, 1)))))


def default_min_cluster_size(n: int, min_samples: int) -> int:
    """Smallest cluster for n items: max(min_samples, round(sqrt(n) / 2)), at least 2 and at most n (32: 3; 1,000:
    16; 84k: 145), so that a small odd group of a few percent of the items is still a cluster."""
    return min(n, max(2, min_samples, round(math.sqrt(n) / 2)))


def auto_pca_dim(n: int, d: int) -> int:
    """Components kept by automatic PCA: ceil(n / 4) clipped to 2..50 when d > n (density on few, wide vectors is
    dominated by noise dimensions); 0 (no PCA) otherwise."""
    if d <= n:
        return 0
    return min(d, max(2, min(AUTO_PCA_MAX_DIM, math.ceil(n / 4))))


def resolve_params(params: ClusterParams, n: int, d: int) -> ClusterParams:
    """`params` with every unset default that applies to its algorithm filled in for n items of dimension d."""
    p = params
    values: dict[str, Any] = {}
    if p.algorithm == "kmeans" and p.n_init is None:
        values["n_init"] = DEFAULT_N_INIT
    if p.algorithm in DENSITY_ALGORITHMS:
        ms = p.min_samples if p.min_samples is not None else default_min_samples(n)
        values["min_samples"] = ms
        if p.algorithm != "dbscan" and p.min_cluster_size is None:
            values["min_cluster_size"] = default_min_cluster_size(n, ms)
        if p.metric is None:
            values["metric"] = "cosine"
        if p.pca_dim is None:
            values["pca_dim"] = auto_pca_dim(n, d)
    elif p.pca_dim is None:
        values["pca_dim"] = 0
    return dataclasses.replace(p, **values) if values else p


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def is_degenerate(labels: np.ndarray) -> bool:
    clusters = len(set(labels.tolist()) - {NOISE})
    return clusters <= 1 or float((labels == NOISE).mean()) > DEGENERATE_NOISE_FRACTION


def robust_knee_candidates(curve: np.ndarray) -> list[float]:
    """Knees of the k-distance curve and of the curve without its top 10 % and 20 % (a few far outliers make the
    chord steep and push the plain knee to the top of the curve), distinct, in that order."""
    y = np.asarray(curve, dtype=np.float64)
    out: list[float] = []
    for share in (1.0, 0.9, 0.8):
        m = max(3, math.ceil(share * y.size))
        value = knee(y[:m])
        if value > 0 and all(abs(value - o) > 1e-9 for o in out):
            out.append(value)
    return out


def degenerate_warnings(
    labels: np.ndarray, p: ClusterParams, *, eps: float | None, k_distance: np.ndarray | None
) -> list[str]:
    """What is wrong with a density clustering that found one cluster or mostly noise, and which parameter to move."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    clusters = len(set(labels.tolist()) - {NOISE})
    noise = float((labels == NOISE).mean()) if n else 0.0
    curve = ""
    if k_distance is not None and k_distance.size:
        q = np.quantile(k_distance, [0.1, 0.5, 0.9])
        curve = f" (k-distance for min_samples={p.min_samples}: 10% {q[0]:.3g}, median {q[1]:.3g}, 90% {q[2]:.3g})"
    out = []
    if noise > DEGENERATE_NOISE_FRACTION:
        if p.algorithm == "dbscan":
            hint = f"raise eps above {eps:.3g}{curve} or lower min_samples (now {p.min_samples})"
        else:
            hint = f"lower min_cluster_size (now {p.min_cluster_size}) or min_samples (now {p.min_samples})"
        out.append(f"degenerate: {noise:.0%} of the items are noise; {hint}")
    elif clusters <= 1:
        if p.algorithm == "dbscan":
            hint = f"lower eps below {eps:.3g}{curve} or raise min_samples (now {p.min_samples})"
        else:
            hint = f"lower min_cluster_size (now {p.min_cluster_size}) or min_samples (now {p.min_samples})"
        out.append(f"degenerate: {clusters} cluster{'' if clusters == 1 else 's'} for {n} items; {hint}")
    return out
