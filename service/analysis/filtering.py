"""Filtering with defaults chosen from the data: which items to remove, given a few examples of unwanted ones.

    result = auto_filter(keys, vectors, ["page.png", "astronaut.png"], unwanted=truly_unwanted)
    result.method, result.reason, result.remove, result.quality

The distance to the nearest example does not separate unwanted images from wanted ones when the unwanted set is
varied (a document page and a photo are as far from each other as from a retinal scan), so the choice goes, in
this order:

1. **density clusters** (HDBSCAN with its scaled defaults, cosine): when the examples fall in clusters that are
   not the largest one and together hold at most half of the items, remove those clusters;
2. **a two-way split** (K-means, k = 2, on L2-normalised rows): when every example falls in the smaller side,
   remove that side;
3. **the gap**: remove every item closer (cosine) to its nearest example than the middle of the widest gap in the
   sorted distances (below their median), the examples included.

The result says which rule was used and why (`FilterResult.reason`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from service.analysis import evaluate
from service.analysis.cluster import cluster
from service.analysis.density import unit_rows
from service.types import NOISE, ClusterParams, FilterResult

logger = logging.getLogger(__name__)

MAX_REMOVED_SHARE = 0.5
"""Cluster rules never remove more than this share of the items (the wanted data is assumed to be the majority)."""


def _indices(keys: Sequence[str], examples: Sequence[str]) -> list[int]:
    index = {k: i for i, k in enumerate(keys)}
    missing = [e for e in examples if e not in index]
    if missing:
        raise KeyError(f"example keys not in the data: {', '.join(missing[:5])}")
    if not examples:
        raise ValueError("give at least one example key")
    return [index[e] for e in examples]


def _with(result: FilterResult, reason: str, clusters: Sequence[int] = ()) -> FilterResult:
    logger.info("filter: %s", reason)
    return dataclasses.replace(result, reason=reason, removed_clusters=sorted(int(c) for c in clusters))


def by_density(
    keys: Sequence[str], x: np.ndarray, rows: list[int], *, seed: int = 0, unwanted: Sequence[str] | None = None
) -> FilterResult | None:
    """Rule 1: the examples' density clusters, when they stand apart from the largest cluster; else None."""
    if len(keys) < 4:
        return None
    labels = cluster(x, ClusterParams(algorithm="hdbscan", seed=seed)).labels
    sizes = {int(c): int(s) for c, s in zip(*np.unique(labels[labels != NOISE], return_counts=True), strict=True)}
    found = sorted({int(labels[i]) for i in rows} - {NOISE})
    if not found or not sizes:
        return None
    largest = max(sizes, key=lambda c: sizes[c])
    total = sum(sizes[c] for c in found)
    if largest in found or total > MAX_REMOVED_SHARE * len(keys):
        return None
    mask = np.isin(labels, found)
    mask[rows] = True
    r = evaluate.filter_mask(keys, mask, "cluster", unwanted, None)
    reason = (
        f"the examples fall in density cluster(s) {found} ({total} items) apart from the largest cluster "
        f"({sizes[largest]} items): removed those clusters"
    )
    return _with(r, reason, found)


def by_split(
    keys: Sequence[str], x: np.ndarray, rows: list[int], *, seed: int = 0, unwanted: Sequence[str] | None = None
) -> FilterResult | None:
    """Rule 2: the smaller side of a K-means k=2 split, when it holds every example; else None."""
    if len(keys) < 3:
        return None
    labels = cluster(unit_rows(x), ClusterParams(k=2, seed=seed)).labels
    sides = {int(labels[i]) for i in rows}
    if len(sides) != 1:
        return None
    side = sides.pop()
    size = int((labels == side).sum())
    if size > MAX_REMOVED_SHARE * len(keys):
        return None
    r = evaluate.filter_mask(keys, labels == side, "cluster", unwanted, None)
    reason = f"every example falls in the smaller side ({size} of {len(keys)} items) of a two-way split: removed it"
    return _with(r, reason, [side])


def gap_threshold(distances: np.ndarray) -> float:
    """The middle of the widest gap between consecutive sorted distances below their median (the examples' own
    zero distances left out); the smallest distance when there is no gap."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    d = d[d > 1e-9]
    if d.size < 2:
        return float(d[0]) if d.size else 0.0
    lower = d[: max(2, (d.size + 1) // 2)]
    gaps = np.diff(lower)
    i = int(np.argmax(gaps))
    return float((lower[i] + lower[i + 1]) / 2)


def by_gap(
    keys: Sequence[str], x: np.ndarray, rows: list[int], *, unwanted: Sequence[str] | None = None
) -> FilterResult:
    """Rule 3: everything closer (cosine, on L2-normalised rows) to an example than the gap in the distances."""
    u = unit_rows(x).astype(np.float64)
    nearest = evaluate.nearest_distance(u, u[rows])
    threshold = gap_threshold(np.delete(nearest, rows))
    mask = nearest <= threshold
    mask[rows] = True
    r = evaluate.filter_mask(keys, mask, "distance", unwanted, threshold)
    reason = (
        f"no cluster holds the examples apart from the rest: removed items within {threshold:.4g} (euclidean on "
        "L2-normalised vectors) of an example, the middle of the widest gap in the distances"
    )
    return _with(r, reason)


def auto_filter(
    keys: Sequence[str],
    x: np.ndarray,
    examples: Sequence[str],
    *,
    seed: int = 0,
    unwanted: Sequence[str] | None = None,
) -> FilterResult:
    """The items to remove, the method chosen from the data (density clusters, two-way split, distance gap)."""
    rows = _indices(keys, examples)
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} keys for {x.shape[0]} vectors")
    for rule in (by_density, by_split):
        found = rule(keys, x, rows, seed=seed, unwanted=unwanted)
        if found is not None:
            return found
    return by_gap(keys, x, rows, unwanted=unwanted)
