"""Outlier scores (issue 15): k-th neighbour distance and LOF equal a brute-force numpy reference; real photos
planted among the 32 OCT scans rank at the top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.analysis import outliers
from service.analysis.report import render_outliers
from service.app.analysis import outliers_items
from service.types import FetchedItems, OutlierQuery

PLANTED = ("astronaut.png", "coffee.png", "page.png")


def _brute(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-distance and LOF by their definitions (Breunig et al. 2000), with full distance matrices."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(((u[:, None, :] - u[None, :, :]) ** 2).sum(-1), 0.0))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    kdist = np.take_along_axis(d, order[:, -1:], axis=1)[:, 0]
    reach = np.maximum(d[np.arange(len(u))[:, None], order], kdist[order])
    lrd = 1.0 / reach.mean(axis=1)
    lof = lrd[order].mean(axis=1) / lrd
    return kdist, lof


def test_scores_equal_the_definitions() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(80, 8)) + 3.0, rng.normal(size=(3, 8)) * 4.0])
    kth, lof, k = outliers.outlier_scores(x, 6)
    ref_k, ref_lof = _brute(x, 6)
    assert k == 6
    np.testing.assert_allclose(kth, ref_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lof, ref_lof, rtol=1e-4)
    with pytest.raises(ValueError, match="between 1 and"):
        outliers.outlier_scores(x, 83)


def test_planted_photos_rank_at_the_top(
    oct_embeddings: np.ndarray, oct_files: list[Path], photo_embeddings: np.ndarray, photo_files: list[Path]
) -> None:
    rows = [i for i, f in enumerate(photo_files) if f.name in PLANTED]
    keys = [f.name for f in oct_files] + [photo_files[i].name for i in rows]
    paths = [str(f) for f in oct_files] + [str(photo_files[i]) for i in rows]
    items = FetchedItems(keys, np.concatenate([oct_embeddings, photo_embeddings[rows]]), [{"path": p} for p in paths])
    r = outliers_items(items, OutlierQuery(collection="oct"))
    print(f"\ntop 5 of {r.n} (k={r.k}): {list(zip(r.keys[:5], r.lof[:5].round(2), strict=True))}")
    assert set(r.keys[: len(PLANTED)]) == set(PLANTED)
    assert r.k == 5 and r.n == len(keys) and (np.diff(r.score) <= 0).all()
    page = render_outliers(outliers_items(items, OutlierQuery(collection="oct", top=4)))
    assert page.count("<img ") == 4 and 'id="outliers"' in page and "astronaut.png" in page
