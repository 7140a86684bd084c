"""Density clustering with its defaults (issue 15): scaled defaults, cosine, automatic PCA, a robust eps, degenerate
results flagged, inapplicable parameters refused. On the 32 real OCT scans, with real photos planted among them, and
on separated blobs with a small odd group."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import DBSCAN
from sklearn.datasets import make_blobs

from service.analysis import density
from service.analysis.cluster import ClusterParams, cluster
from service.errors import ConfigError

DENSITY = ["dbscan", "hdbscan", "optics"]
PLANTED = ("astronaut.png", "coffee.png", "page.png", "text.png")


def test_default_rules_scale_with_n() -> None:
    assert [density.default_min_samples(n) for n in (32, 1000, 84_484)] == [3, 7, 11]
    assert [density.default_min_cluster_size(n, density.default_min_samples(n)) for n in (32, 1000, 84_484)] == [
        3,
        16,
        145,
    ]
    assert density.default_min_samples(2) == 2  # never more than n
    assert density.auto_pca_dim(32, 1280) == 8 and density.auto_pca_dim(2000, 1280) == 0
    assert density.auto_pca_dim(400, 1280) == 50 and density.auto_pca_dim(4, 1280) == 2
    p = density.resolve_params(ClusterParams(algorithm="hdbscan"), 32, 1280)
    assert (p.min_samples, p.min_cluster_size, p.metric, p.pca_dim) == (3, 3, "cosine", 8)
    assert density.resolve_params(ClusterParams(algorithm="kmeans", k=3), 32, 1280).n_init == 4


@pytest.mark.parametrize(
    ("params", "name"),
    [
        (dict(algorithm="dbscan", k=4), "k"),
        (dict(algorithm="hdbscan", eps=0.5), "eps"),
        (dict(algorithm="kmeans", min_samples=5), "min_samples"),
        (dict(algorithm="dbscan", min_cluster_size=5), "min_cluster_size"),
        (dict(algorithm="optics", n_init=3), "n_init"),
        (dict(algorithm="kmedoids", metric="cosine"), "metric"),
    ],
)
def test_parameters_that_do_not_apply_are_errors(params: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} does not apply to {params['algorithm']}"):
        ClusterParams(**params)  # type: ignore[arg-type]


def test_cosine_is_euclidean_on_unit_rows_against_sklearn() -> None:
    """metric=cosine equals scikit-learn's DBSCAN(metric='cosine') at the matching radius (cos distance = c²/2)."""
    x, _ = make_blobs(n_samples=200, centers=3, n_features=6, cluster_std=0.5, random_state=2)
    x = x.astype(np.float32) + 20.0
    eps_chord = 0.05
    ours = cluster(x, ClusterParams(algorithm="dbscan", eps=eps_chord, min_samples=4, pca_dim=0, backend="sklearn"))
    ref = DBSCAN(eps=eps_chord**2 / 2, min_samples=4, metric="cosine").fit_predict(x)
    assert ((ours.labels == -1) == (ref == -1)).all()
    pairs = set(zip(ref.tolist(), ours.labels.tolist(), strict=True))
    assert len(pairs) == len(set(ref.tolist()))


@pytest.mark.parametrize("algorithm", DENSITY)
def test_real_oct_scans_defaults_find_more_than_one_cluster(oct_embeddings: np.ndarray, algorithm: str) -> None:
    r = cluster(oct_embeddings, ClusterParams(algorithm=algorithm))  # type: ignore[arg-type]
    print(f"\n{algorithm} defaults on 32 real scans: {r.n_clusters} clusters, noise {r.metrics['noise_fraction']:.2f}")
    assert r.n_clusters > 1
    assert r.params.min_samples == 3 and r.params.pca_dim == 8 and r.params.metric == "cosine"
    if algorithm != "optics":  # OPTICS on 32 items leaves most as noise but still finds clusters
        assert r.metrics["noise_fraction"] <= 0.5 and not r.warnings


@pytest.mark.parametrize("algorithm", DENSITY)
def test_planted_photos_among_real_scans_are_set_apart(
    oct_embeddings: np.ndarray, photo_embeddings: np.ndarray, photo_files: list[Path], algorithm: str
) -> None:
    rows = [i for i, f in enumerate(photo_files) if f.name in PLANTED]
    x = np.concatenate([oct_embeddings, photo_embeddings[rows]])
    odd = np.arange(x.shape[0]) >= oct_embeddings.shape[0]
    r = cluster(x, ClusterParams(algorithm=algorithm))  # type: ignore[arg-type]
    assert r.n_clusters > 1
    # Each planted photo is noise or in a cluster that holds no scan.
    scan_clusters = set(r.labels[~odd].tolist()) - {-1}
    assert not (set(r.labels[odd].tolist()) & scan_clusters)
    if algorithm == "hdbscan":
        assert len(set(r.labels[odd].tolist())) == 1 and r.labels[odd][0] != -1  # the odd group is a cluster


@pytest.mark.parametrize("algorithm", DENSITY)
def test_blobs_with_a_small_odd_group(algorithm: str) -> None:
    x, _ = make_blobs(n_samples=300, centers=3, n_features=64, cluster_std=1.0, center_box=(-10, 10), random_state=0)
    odd = np.random.default_rng(0).normal(0.0, 1.0, size=(12, 64)) + 25.0
    data = np.concatenate([x, odd]).astype(np.float32)
    r = cluster(data, ClusterParams(algorithm=algorithm))  # type: ignore[arg-type]
    assert r.n_clusters == 4 and not r.warnings
    odd_labels = set(r.labels[300:].tolist())
    assert len(odd_labels) == 1 and -1 not in odd_labels
    assert odd_labels.isdisjoint(set(r.labels[:300].tolist()))


def test_degenerate_results_say_which_parameter_to_move(oct_embeddings: np.ndarray) -> None:
    one = cluster(oct_embeddings, ClusterParams(algorithm="dbscan", eps=1.9))
    assert one.n_clusters == 1 and len(one.warnings) == 1
    assert "lower eps below 1.9" in one.warnings[0] and "k-distance for min_samples=3" in one.warnings[0]
    noise = cluster(oct_embeddings, ClusterParams(algorithm="hdbscan", min_cluster_size=30))
    assert noise.warnings and "min_cluster_size (now 30)" in noise.warnings[0]
    fine = cluster(oct_embeddings, ClusterParams(algorithm="kmeans", k=3))
    assert fine.warnings == []


def test_robust_knee_ignores_a_far_tail() -> None:
    # A flat curve with a few far outliers: the plain knee sits at the top, the trimmed ones below it.
    curve = np.concatenate([np.linspace(0.5, 0.7, 45), [1.5, 1.8, 2.0, 2.2, 2.5]])
    cands = density.robust_knee_candidates(curve)
    assert cands[0] == density.knee(curve)
    assert all(c <= 0.7 + 1e-9 for c in cands) and all(math.isfinite(c) for c in cands)
