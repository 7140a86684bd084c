"""Outlier scores without training anything: how far each item lies from the others.

    result = rank_outliers(keys, vectors)             # OutlierResult, most unusual first
    result.keys[:5], result.kth_distance[:5], result.lof[:5]

Two scores per item, both on L2-normalised vectors (euclidean there is sqrt(2 - 2 cos)):

- the distance to its k-th nearest neighbour (itself not counted): large for an item far from everything;
- the local outlier factor (LOF, Breunig et al. 2000, scikit-learn's `LocalOutlierFactor`): its neighbours' local
  density over its own; about 1 inside a cluster, above 1 for an item in a sparser place than its neighbours
  (which also catches an item on the fringe of a dense cluster that a global distance would miss).

Items are ranked by the mean of their two ranks (`score`: 1 is the most unusual, 0 the least), so that neither
scale dominates. k defaults to max(5, round(ln n)), at most n - 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.analysis.density import unit_rows
from service.errors import ConfigError
from service.types import OutlierResult


def default_k(n: int) -> int:
    """Neighbours for n items: max(5, round(ln n)), at most n - 1."""
    return max(1, min(n - 1, max(5, round(math.log(max(n, 1))))))


def outlier_scores(x: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(distance to the k-th neighbour, LOF, k) of every row of `x`, on L2-normalised rows; float64 arrays."""
    from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

    n = x.shape[0]
    if n < 3:
        raise ConfigError(f"outlier scores need at least 3 items, got {n}")
    kk = default_k(n) if k is None else k
    if not 1 <= kk < n:
        raise ConfigError(f"k={kk} must be between 1 and n - 1 = {n - 1}")
    u = unit_rows(np.asarray(x, dtype=np.float32)).astype(np.float64)
    dist, _ = NearestNeighbors(n_neighbors=kk + 1).fit(u).kneighbors(u)
    # Column 0 is the item itself (distance 0) unless it has exact duplicates; either way kk + 1 columns hold it.
    kth = dist[:, kk]
    lof = -LocalOutlierFactor(n_neighbors=kk).fit(u).negative_outlier_factor_
    return kth.astype(np.float64), np.asarray(lof, dtype=np.float64), kk


def _rank_fraction(values: np.ndarray) -> np.ndarray:
    """Rank of each value as a fraction: 0 the smallest, 1 the largest (ties share the mean rank)."""
    from scipy.stats import rankdata

    n = values.shape[0]
    return (rankdata(values) - 1) / max(n - 1, 1)


def rank_outliers(
    keys: Sequence[str],
    x: np.ndarray,
    *,
    k: int | None = None,
    top: int = 0,
    paths: Sequence[str] | None = None,
) -> OutlierResult:
    """Every item (or the `top` first) ranked most unusual first, with both scores (see the module docstring)."""
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} keys for {x.shape[0]} vectors")
    kth, lof, kk = outlier_scores(x, k)
    score = (_rank_fraction(kth) + _rank_fraction(lof)) / 2
    # Most unusual first; ties broken by LOF, then by the key (a stable, reproducible order).
    order = sorted(range(len(keys)), key=lambda i: (-score[i], -lof[i], keys[i]))
    if top:
        order = order[:top]
    return OutlierResult(
        keys=[keys[i] for i in order],
        kth_distance=kth[order],
        lof=lof[order],
        score=score[order],
        k=kk,
        n=len(keys),
        paths=[paths[i] for i in order] if paths is not None and any(paths) else None,
    )
