"""service.analysis.evaluate: metrics equal scikit-learn's; Hungarian accuracy by hand; probes; filtering."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from service.analysis import evaluate as ev


def test_hungarian_accuracy_on_a_hand_made_case() -> None:
    truth = ["a", "a", "a", "b", "b", "c"]
    clusters = np.array([2, 2, 0, 1, 1, 0])  # best one-to-one map: 2->a (2), 1->b (2), 0->c (1)
    assert ev.hungarian_accuracy(truth, clusters) == 5 / 6
    # Noise never counts as correct, and one cluster cannot serve two classes.
    assert ev.hungarian_accuracy(truth, np.array([0, 0, -1, 0, 0, 0])) == 2 / 6
    assert ev.purity(truth, np.array([0, 0, -1, 0, 0, 0])) == 2 / 6
    assert ev.purity(truth, clusters) == 5 / 6


def test_contingency_table() -> None:
    table = ev.contingency(["x", "y", "x", "y"], np.array([1, 1, 0, -1]))
    assert table.clusters == [-1, 0, 1] and table.classes == ["x", "y"]
    np.testing.assert_array_equal(table.counts, [[0, 1], [1, 0], [1, 1]])
    text = table.format()
    assert "noise" in text and "total" in text


def test_metrics_equal_sklearn() -> None:
    x, y = make_blobs(n_samples=300, centers=3, random_state=0)
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(300) < 0.2, rng.integers(0, 3, 300), y)
    truth = [str(v) for v in y]
    m = ev.supervised_metrics(truth, labels)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, labels))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, labels))
    assert ev.silhouette(x, labels) == pytest.approx(silhouette_score(x, labels))
    # Sampled: the same as scikit-learn on the same sample.
    s = ev.silhouette(x, labels, sample_size=100, seed=3)
    idx = np.random.default_rng(3).choice(300, 100, replace=False)
    assert s == pytest.approx(silhouette_score(x[idx], labels[idx]))
    # Noise is left out of the silhouette.
    noisy = labels.copy()
    noisy[:10] = -1
    assert ev.silhouette(x, noisy) == pytest.approx(silhouette_score(x[10:], noisy[10:]))
    u = ev.unsupervised_metrics(x, noisy)
    assert u["noise_fraction"] == pytest.approx(10 / 300) and u["n_clusters"] == 3
    assert ev.silhouette(x, np.zeros(300, np.int64)) is None


def test_probe_on_separable_data_is_accurate() -> None:
    x, y = make_blobs(n_samples=120, centers=3, n_features=8, random_state=1)
    truth = [f"c{v}" for v in y]
    for clf in ("logreg", "knn"):
        r = ev.run_probe(x, truth, classifier=clf, folds=5)  # type: ignore[arg-type]
        assert r.accuracy == 1.0 and r.folds == 5
        assert r.confusion.sum() == 120 and np.trace(r.confusion) == 120
        assert [c.name for c in r.per_class] == ["c0", "c1", "c2"]
        assert "confusion" in r.format()


def test_grouped_probe_keeps_groups_on_one_side() -> None:
    x, y = make_blobs(n_samples=60, centers=2, n_features=4, random_state=2)
    groups = [str(i // 3) for i in range(60)]
    r = ev.run_probe(x, [str(v) for v in y], groups=groups, group_name="patient", folds=4)
    assert r.grouped_by == "patient" and r.folds == 4 and r.accuracy > 0.9


def test_filter_by_clusters_and_examples() -> None:
    keys = [f"k{i}" for i in range(10)]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, -1, 0, 1])
    unwanted = ["k2", "k3", "k4", "k7"]
    r = ev.filter_by_clusters(keys, labels, [1], unwanted=unwanted)
    assert r.remove == ["k2", "k3", "k4", "k9"] and len(r.keep) == 6
    assert r.precision == 0.75 and r.recall == 0.75 and r.quality == pytest.approx(0.75)
    assert ev.example_clusters(keys, labels, ["k2", "k7"]) == [1]

    x = np.array([[0.0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [9, 9]], np.float32)
    k6 = [f"p{i}" for i in range(6)]
    r = ev.filter_by_examples(k6, x, ["p0", "p1"], unwanted=["p0", "p1", "p2"])
    assert r.remove == ["p0", "p1", "p2"] and r.threshold == pytest.approx(0.1)
    assert r.precision == 1.0 and r.recall == 1.0 and r.quality == pytest.approx(1.0)
    r = ev.filter_by_examples(k6, x, ["p3"], max_distance=0.5)
    assert r.remove == ["p3", "p4"]
    with pytest.raises(ValueError, match="max_distance"):
        ev.filter_by_examples(k6, x, ["p3"])
    with pytest.raises(KeyError):
        ev.filter_by_examples(k6, x, ["nope"])
    p, rc, q = ev.filter_quality(["a", "b"], ["b", "c", "d", "e"])
    assert (p, rc) == (0.5, 0.25) and q == pytest.approx(0.3 * 0.5 + 0.7 * 0.25)


def test_raw_pixel_features(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 30, 3), i * 40, np.uint8)).save(p)
        paths.append(p)
    f = ev.raw_pixel_features(paths, size=8, pca_dim=None)
    assert f.shape == (5, 64) and f.dtype == np.float32
    assert f[4, 0] == pytest.approx(160 / 255, abs=1e-3)
    assert ev.raw_pixel_features(paths, size=8, pca_dim=3).shape == (5, 3)
