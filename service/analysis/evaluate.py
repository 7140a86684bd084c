"""Judging clusterings and embeddings: quality metrics, raw-pixel baseline features, supervised probes, filtering.

- Without labels: `unsupervised_metrics` (silhouette, sampled for large n; cluster sizes; noise fraction).
- With a ground truth: `supervised_metrics` (accuracy by Hungarian matching, NMI, ARI, purity) and
  `contingency` (the cluster-by-class table).
- `raw_pixel_features`: grayscale, downscaled, PCA-reduced pixels, the baseline the OCT study started from.
- `run_probe`: logistic-regression linear probe or kNN classifier with stratified (optionally grouped)
  cross-validation.
- `filter_by_clusters` / `filter_by_examples`: which keys to remove and keep, with precision, recall and the
  filtering studies' quality 0.3·precision + 0.7·recall when the truly unwanted keys are known.

Noise (cluster -1, from DBSCAN, HDBSCAN, OPTICS) is left out of the silhouette and of the Hungarian matching
(a noise point is never counted as correct); NMI and ARI see noise as one more cluster, as scikit-learn does.
Everything here runs on the CPU (numpy, scipy, scikit-learn).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.types import (
    NOISE,
    Classifier,
    ClassReport,
    Contingency,
    FilterResult,
    ProbeResult,
)

logger = logging.getLogger(__name__)


QUALITY_PRECISION_WEIGHT = 0.3
"""Weight of precision in the filtering quality score (recall gets the rest), as in the filtering studies."""


# -- metrics ------------------------------------------------------------------------------------------------------


def contingency(truth: Sequence[str], labels: np.ndarray) -> Contingency:
    """Count items per (cluster, class); clusters sorted (noise first), classes sorted by name."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(truth) != labels.shape[0]:
        raise ValueError(f"{len(truth)} ground-truth values for {labels.shape[0]} cluster labels")
    classes = sorted(set(truth))
    clusters = sorted(set(labels.tolist()))
    ci = {c: i for i, c in enumerate(clusters)}
    ki = {k: j for j, k in enumerate(classes)}
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, ([ci[c] for c in labels.tolist()], [ki[t] for t in truth]), 1)
    return Contingency(clusters=clusters, classes=classes, counts=counts)


def hungarian_matching(table: Contingency) -> list[tuple[int, int]]:
    """The one-to-one matching of clusters to classes that covers the most items: (row, column) indices into
    `table.counts`, sorted by row. The noise row is never matched; with more clusters than classes (or fewer)
    the surplus stays unmatched."""
    from scipy.optimize import linear_sum_assignment

    keep = [i for i, c in enumerate(table.clusters) if c != NOISE]
    if not keep or not table.classes:
        return []
    rows, cols = linear_sum_assignment(table.counts[keep], maximize=True)
    return [(keep[r], int(c)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]


def hungarian_accuracy(truth: Sequence[str], labels: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (noise and unmatched clusters count wrong)."""
    if len(truth) == 0:
        return 0.0
    table = contingency(truth, labels)
    return float(sum(int(table.counts[r, c]) for r, c in hungarian_matching(table)) / len(truth))


def purity(truth: Sequence[str], labels: np.ndarray) -> float:
    """Share of items whose cluster's majority class is their class (noise counts wrong)."""
    if len(truth) == 0:
        return 0.0
    table = contingency(truth, labels)
    keep = [i for i, c in enumerate(table.clusters) if c != NOISE]
    return float(table.counts[keep].max(axis=1).sum() / len(truth)) if keep else 0.0


def supervised_metrics(truth: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """accuracy (Hungarian), nmi, ari and purity of `labels` against the classes in `truth`."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels, dtype=np.int64)
    return {
        "accuracy": hungarian_accuracy(truth, labels),
        "nmi": float(normalized_mutual_info_score(list(truth), labels)),
        "ari": float(adjusted_rand_score(list(truth), labels)),
        "purity": purity(truth, labels),
    }


def silhouette(x: np.ndarray, labels: np.ndarray, *, sample_size: int = 5000, seed: int = 0) -> float | None:
    """Mean silhouette (euclidean) of the non-noise points; a random sample of `sample_size` when there are more.

    None when it is undefined (fewer than 2 clusters, or every point its own cluster).
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels, dtype=np.int64)
    mask = labels != NOISE
    xs, ls = x[mask], labels[mask]
    n_clusters = len(np.unique(ls))
    if n_clusters < 2 or n_clusters >= xs.shape[0]:
        return None
    sample = sample_size if xs.shape[0] > sample_size else None
    if sample is not None:
        # A sample can miss a cluster: take it ourselves and retry the rare undefined case on all points.
        rng = np.random.default_rng(seed)
        idx = rng.choice(xs.shape[0], sample, replace=False)
        if 2 <= len(np.unique(ls[idx])) < sample:
            return float(silhouette_score(xs[idx], ls[idx]))
    return float(silhouette_score(xs, ls))


def cluster_sizes(labels: np.ndarray) -> dict[int, int]:
    """Items per cluster id (noise under -1), sorted by id."""
    ids, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}


def unsupervised_metrics(
    x: np.ndarray, labels: np.ndarray, *, silhouette_sample: int = 5000, seed: int = 0
) -> dict[str, float]:
    """n_clusters, noise_fraction, silhouette (NaN when undefined), largest/smallest cluster sizes."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    sizes = {c: s for c, s in cluster_sizes(labels).items() if c != NOISE}
    sil = silhouette(x, labels, sample_size=silhouette_sample, seed=seed) if n else None
    return {
        "n_clusters": float(len(sizes)),
        "noise_fraction": float((labels == NOISE).sum() / n) if n else 0.0,
        "silhouette": float("nan") if sil is None else sil,
        "largest_cluster": float(max(sizes.values(), default=0)),
        "smallest_cluster": float(min(sizes.values(), default=0)),
    }


# -- baseline features ----------------------------------------------------------------------------------------------


def raw_pixel_features(
    paths: Sequence[str | Path], *, size: int = 64, pca_dim: int | None = 16, seed: int = 0
) -> np.ndarray:
    """Raw-pixel baseline: each image in grayscale, resized to `size`×`size` (bilinear), scaled to [0, 1], then PCA.

    `pca_dim=None` keeps all `size²` pixels. Returns float32 (n, dim).
    """
    from PIL import Image

    rows = []
    for p in paths:
        with Image.open(p) as img:
            small = img.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        rows.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
    x = np.stack(rows) if rows else np.zeros((0, size * size), np.float32)
    if pca_dim is not None and x.shape[0] > 1:
        x = pca_reduce(x, pca_dim, seed=seed)
    return x.astype(np.float32, copy=False)


def pca_reduce(x: np.ndarray, dim: int, *, seed: int = 0) -> np.ndarray:
    """Project `x` on its first `dim` principal components (capped by the rank of the data); float32."""
    from sklearn.decomposition import PCA

    dim = min(dim, x.shape[0], x.shape[1])
    return np.asarray(PCA(n_components=dim, random_state=seed).fit_transform(x), dtype=np.float32)


# -- supervised probes ----------------------------------------------------------------------------------------------


def run_probe(
    x: np.ndarray,
    truth: Sequence[str],
    *,
    classifier: Classifier = "logreg",
    folds: int = 5,
    groups: Sequence[str] | None = None,
    group_name: str | None = None,
    knn_k: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """Cross-validated classification of `truth` from `x` (each item predicted by a model that never saw it).

    Folds are stratified by class; with `groups` (e.g. patient ids) StratifiedGroupKFold keeps each group on
    one side. `folds` is lowered to what the data allow (the smallest class, or the number of groups).
    Features are standardised inside each fold; the logistic regression is L2-regularised (C=1).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(list(truth), dtype=object)
    n = y.shape[0]
    if n != x.shape[0]:
        raise ValueError(f"{n} labels for {x.shape[0]} vectors")
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise ValueError("a probe needs at least two classes in the ground truth")
    smallest = min(int((y == c).sum()) for c in classes)
    splits = min(folds, smallest)
    if groups is not None:
        g = np.asarray(list(groups), dtype=object)
        if g.shape[0] != n:
            raise ValueError(f"{g.shape[0]} group values for {n} vectors")
        splits = min(splits, len(set(g.tolist())))
    if splits < 2:
        raise ValueError(f"too few items for cross-validation: the smallest class has {smallest}")
    if groups is not None:
        splitter: StratifiedKFold | StratifiedGroupKFold = StratifiedGroupKFold(
            n_splits=splits, shuffle=True, random_state=seed
        )
        split_iter = splitter.split(x, y, g)
    else:
        splitter = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
        split_iter = splitter.split(x, y)
    pred = np.empty(n, dtype=object)
    fold_acc = []
    for train, test in split_iter:
        if classifier == "logreg":
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        elif classifier == "knn":
            model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(knn_k, len(train))))
        else:
            raise ValueError(f"unknown classifier {classifier!r}; use 'logreg' or 'knn'")
        model.fit(x[train], y[train])
        pred[test] = model.predict(x[test])
        fold_acc.append(float((pred[test] == y[test]).mean()))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    per_class = [
        ClassReport(name=c, precision=float(p[i]), recall=float(r[i]), f1=float(f[i]), support=int(s[i]))
        for i, c in enumerate(classes)
    ]
    return ProbeResult(
        classifier=classifier,
        folds=splits,
        grouped_by=group_name if groups is not None else None,
        accuracy=float((pred == y).mean()),
        fold_accuracy=fold_acc,
        chance=max(int((y == c).sum()) for c in classes) / n,
        classes=classes,
        per_class=per_class,
        confusion=confusion_matrix(y, pred, labels=classes),
        predictions=[str(v) for v in pred],
    )


# -- filtering ------------------------------------------------------------------------------------------------------


def filter_quality(removed: Sequence[str], unwanted: Sequence[str]) -> tuple[float, float, float]:
    """(precision, recall, 0.3·precision + 0.7·recall) of removing `removed` when `unwanted` should go."""
    rem, bad = set(removed), set(unwanted)
    hit = len(rem & bad)
    precision = hit / len(rem) if rem else 0.0
    recall = hit / len(bad) if bad else 0.0
    return precision, recall, QUALITY_PRECISION_WEIGHT * precision + (1 - QUALITY_PRECISION_WEIGHT) * recall


def _result(
    keys: Sequence[str], remove_mask: np.ndarray, method: str, unwanted: Sequence[str] | None, threshold: float | None
) -> FilterResult:
    remove = [k for k, m in zip(keys, remove_mask.tolist(), strict=True) if m]
    keep = [k for k, m in zip(keys, remove_mask.tolist(), strict=True) if not m]
    if unwanted is None:
        return FilterResult(remove=remove, keep=keep, method=method, threshold=threshold)
    p, r, q = filter_quality(remove, unwanted)
    return FilterResult(remove=remove, keep=keep, method=method, threshold=threshold, precision=p, recall=r, quality=q)


def filter_by_clusters(
    keys: Sequence[str], labels: np.ndarray, clusters: Sequence[int], *, unwanted: Sequence[str] | None = None
) -> FilterResult:
    """Remove every member of `clusters` (cluster ids; -1 is noise)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(keys) != labels.shape[0]:
        raise ValueError(f"{len(keys)} keys for {labels.shape[0]} labels")
    mask = np.isin(labels, np.asarray(list(clusters), dtype=np.int64))
    result = _result(keys, mask, "cluster", unwanted, None)
    return dataclasses.replace(result, removed_clusters=sorted({int(c) for c in clusters}))


def example_clusters(keys: Sequence[str], labels: np.ndarray, examples: Sequence[str]) -> list[int]:
    """The clusters that hold at least one of the example keys (noise excluded), sorted."""
    index = {k: i for i, k in enumerate(keys)}
    missing = [e for e in examples if e not in index]
    if missing:
        raise KeyError(f"example keys not in the data: {', '.join(missing[:5])}")
    found = {int(labels[index[e]]) for e in examples}
    return sorted(c for c in found if c != NOISE)


def filter_by_examples(
    keys: Sequence[str],
    x: np.ndarray,
    examples: Sequence[str],
    *,
    max_distance: float | None = None,
    unwanted: Sequence[str] | None = None,
) -> FilterResult:
    """Remove every item within `max_distance` (euclidean) of its nearest example; the examples are removed too.

    Without `max_distance` the threshold is the examples' own spread: the largest distance from an example to
    its nearest other example (needs at least two examples).
    """
    index = {k: i for i, k in enumerate(keys)}
    missing = [e for e in examples if e not in index]
    if missing:
        raise KeyError(f"example keys not in the data: {', '.join(missing[:5])}")
    if not examples:
        raise ValueError("give at least one example key")
    ex = x[[index[e] for e in examples]].astype(np.float64)
    if max_distance is None:
        if len(examples) < 2:
            raise ValueError("with a single example, give max_distance (how far from it counts as the same)")
        d_ex = _pairwise(ex, ex)
        np.fill_diagonal(d_ex, np.inf)
        max_distance = float(d_ex.min(axis=1).max())
    nearest = np.full(x.shape[0], np.inf)
    for start in range(0, x.shape[0], 8192):
        nearest[start : start + 8192] = _pairwise(x[start : start + 8192].astype(np.float64), ex).min(axis=1)
    mask = nearest <= max_distance
    mask[[index[e] for e in examples]] = True
    return _result(keys, mask, "distance", unwanted, max_distance)


def filter_mask(
    keys: Sequence[str], remove_mask: np.ndarray, method: str, unwanted: Sequence[str] | None, threshold: float | None
) -> FilterResult:
    """The FilterResult that removes the items where `remove_mask` is true (scored when `unwanted` is given)."""
    return _result(keys, np.asarray(remove_mask, dtype=bool), method, unwanted, threshold)


def nearest_distance(x: np.ndarray, examples: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
    """Euclidean distance (float64) of every row of `x` to its nearest row of `examples`, in chunks of rows."""
    out = np.full(x.shape[0], np.inf)
    ex = np.asarray(examples, dtype=np.float64)
    for start in range(0, x.shape[0], chunk):
        out[start : start + chunk] = _pairwise(x[start : start + chunk].astype(np.float64), ex).min(axis=1)
    return out


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0))


def projection_2d(x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The first two principal components of `x` (float32 (n, 2); zeros where the data have fewer dimensions)."""
    out = np.zeros((x.shape[0], 2), dtype=np.float32)
    if x.shape[0] < 2:
        return out
    p = pca_reduce(x, 2, seed=seed)
    out[:, : p.shape[1]] = p
    return out
