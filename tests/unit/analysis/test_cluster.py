"""service.analysis.cluster: every backend agrees with scikit-learn on separated blobs; sweeps, knees, deadlines."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import DBSCAN, HDBSCAN, OPTICS, KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from service.analysis import cluster as cl
from service.analysis.cluster import ClusterInterruptedError, ClusterParams, cluster
from service.errors import ConfigError


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=400, centers=4, n_features=16, cluster_std=0.6, center_box=(-10, 10), random_state=3)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def noisy_blobs() -> np.ndarray:
    """Three tight blobs and a sprinkling of far-off outliers: DBSCAN finds 3 clusters and some noise."""
    x, _ = make_blobs(n_samples=300, centers=3, n_features=8, cluster_std=0.4, center_box=(-8, 8), random_state=5)
    rng = np.random.default_rng(0)
    outliers = rng.uniform(-20, 20, size=(15, 8))
    return np.concatenate([x, outliers]).astype(np.float32)


def _present(algorithm: str) -> list[str]:
    return [b for b in cl.BACKENDS[algorithm] if b != "cuml" and cl.backend_available(b)[0]]


@pytest.mark.parametrize("backend", _present("kmeans"))
def test_kmeans_backends_agree_with_sklearn(blobs: tuple[np.ndarray, np.ndarray], backend: str) -> None:
    x, y = blobs
    reference = KMeans(n_clusters=4, n_init=4, random_state=0).fit_predict(x)
    result = cluster(x, ClusterParams(algorithm="kmeans", k=4, backend=backend))  # type: ignore[arg-type]
    assert result.backend == backend
    assert adjusted_rand_score(reference, result.labels) >= 0.99
    assert adjusted_rand_score(y, result.labels) >= 0.99
    assert result.centers is not None and result.centers.shape == (4, 16)
    assert not result.noise.any()
    assert result.metrics["inertia"] > 0
    # Centroids are the member means.
    for c in range(4):
        np.testing.assert_allclose(result.centers[c], x[result.labels == c].mean(axis=0), atol=1e-3)


def test_kmedoids_agrees_with_sklearn_kmeans(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    reference = KMeans(n_clusters=4, n_init=4, random_state=0).fit_predict(x)
    result = cluster(x, ClusterParams(algorithm="kmedoids", k=4))
    assert result.backend == "kmedoids"
    assert adjusted_rand_score(reference, result.labels) >= 0.99
    assert result.medoids is not None and result.centers is not None
    np.testing.assert_array_equal(result.centers, x[result.medoids])
    assert (result.labels[result.medoids] == np.arange(4)).all()


@pytest.mark.parametrize("backend", _present("dbscan"))
def test_dbscan_equals_sklearn_up_to_renaming(noisy_blobs: np.ndarray, backend: str) -> None:
    x = noisy_blobs
    reference = DBSCAN(eps=1.5, min_samples=5).fit_predict(x)
    result = cluster(x, ClusterParams(algorithm="dbscan", eps=1.5, min_samples=5, metric="euclidean", backend=backend))  # type: ignore[arg-type]
    assert result.backend == backend
    assert (result.noise == (reference == -1)).all()
    assert result.noise.sum() > 0 and result.n_clusters == 3
    # Same partition: a one-to-one map between the cluster ids.
    pairs = set(zip(reference.tolist(), result.labels.tolist(), strict=True))
    assert len(pairs) == len(set(reference.tolist())) == len({b for _, b in pairs})
    assert adjusted_rand_score(reference, result.labels) == 1.0


def test_dbscan_torch_matches_sklearn_numbering_and_borders() -> None:
    x, _ = make_blobs(n_samples=200, centers=2, n_features=2, cluster_std=1.0, random_state=1)
    for eps, ms in [(0.5, 4), (0.8, 6), (0.3, 3)]:
        reference = DBSCAN(eps=eps, min_samples=ms).fit_predict(x)
        ours = cl.dbscan_torch(x.astype(np.float32), eps, ms, device="cpu", chunk=64)
        assert adjusted_rand_score(reference, ours) >= 0.99
        assert ((ours == -1) == (reference == -1)).all()


@pytest.mark.parametrize("algorithm", ["hdbscan", "optics"])
def test_hdbscan_and_optics_find_the_blobs(noisy_blobs: np.ndarray, algorithm: str) -> None:
    params = ClusterParams(algorithm=algorithm, min_samples=5, min_cluster_size=10, metric="euclidean")  # type: ignore[arg-type]
    result = cluster(noisy_blobs, params)
    assert result.backend == "sklearn"
    reference = (
        HDBSCAN(min_cluster_size=10, min_samples=5, copy=True)
        if algorithm == "hdbscan"
        else OPTICS(min_samples=5, min_cluster_size=10)
    ).fit_predict(noisy_blobs)
    assert adjusted_rand_score(reference, result.labels) == 1.0
    assert ((result.labels == -1) == (reference == -1)).all()
    assert result.n_clusters == 3
    assert result.centers is None and result.medoids is None


def test_auto_backend_without_gpu_is_cpu() -> None:
    if cl.cuda_available():
        pytest.skip("CUDA is visible: auto picks a GPU backend")
    assert cl.resolve_backend("kmeans") == "faiss"
    assert cl.resolve_backend("dbscan") == "sklearn"
    assert cl.resolve_backend("kmedoids") == "kmedoids"


def test_cuml_unavailable_says_why() -> None:
    ok, _ = cl.backend_available("cuml")
    if ok:
        pytest.skip("cuML is available here")
    with pytest.raises(cl.BackendUnavailableError, match="cuML"):
        cl.resolve_backend("kmeans", "cuml")


def test_k_auto_picks_the_best_silhouette_and_returns_the_curve(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    result = cluster(x, ClusterParams(algorithm="kmeans", k=None, k_min=2, k_max=7))
    assert [s.k for s in result.sweep] == list(range(2, 8))
    assert result.k == 4 == result.n_clusters
    best = max(result.sweep, key=lambda s: s.silhouette)
    assert best.k == 4
    inertias = [s.inertia for s in result.sweep]
    assert inertias[0] > inertias[2]  # the elbow: inertia falls steeply up to k=4


def test_eps_auto_from_the_k_distance_knee(noisy_blobs: np.ndarray) -> None:
    result = cluster(noisy_blobs, ClusterParams(algorithm="dbscan", eps=None, min_samples=5, metric="euclidean"))
    assert result.k_distance is not None and result.k_distance.shape == (315,)
    assert (np.diff(result.k_distance) >= 0).all()
    assert result.eps is not None and result.k_distance[0] < result.eps < result.k_distance[-1]
    assert result.n_clusters == 3
    assert result.metrics["noise_fraction"] < 0.2


def test_knee_of_a_hand_made_curve() -> None:
    curve = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 5.0, 10.0])
    assert cl.knee(curve) == 1.5


def test_deterministic_with_a_seed(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    for backend in _present("kmeans"):
        a = cluster(x, ClusterParams(k=5, seed=7, backend=backend))  # type: ignore[arg-type]
        b = cluster(x, ClusterParams(k=5, seed=7, backend=backend))  # type: ignore[arg-type]
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.centers, b.centers)


def test_pca_first_and_ground_truth_metrics(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    truth = [f"class{v}" for v in y]
    result = cluster(x, ClusterParams(k=4, pca_dim=3), truth=truth)
    assert result.features.shape == (400, 3)
    assert result.centers is not None and result.centers.shape == (4, 3)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["nmi"] == pytest.approx(1.0)
    assert result.table is not None and result.table.counts.sum() == 400
    d = result.center_distances()
    assert d.shape == (400,) and np.isfinite(d).all()


def test_torch_pca_matches_sklearn(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    from sklearn.decomposition import PCA

    x, _ = blobs
    ref = PCA(n_components=3).fit_transform(x)
    ours = cl.pca_torch(x, 3, device="cpu")
    # scikit-learn flips signs by the largest loading of the components' SVD basis; compare up to sign.
    for j in range(3):
        sign = np.sign(ours[:, j] @ ref[:, j])
        np.testing.assert_allclose(sign * ours[:, j], ref[:, j], atol=1e-3)


def test_should_stop_interrupts_a_sweep(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(ClusterInterruptedError):
        cluster(x, ClusterParams(k=None, k_min=2, k_max=9, backend="torch"), should_stop=stop)


def test_bad_parameters_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="unknown algorithm"):
        ClusterParams(algorithm="spectral")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="has no dbscan"):
        ClusterParams(algorithm="dbscan", backend="faiss")
    with pytest.raises(ConfigError, match="k_min"):
        ClusterParams(k_min=5, k_max=3)
    with pytest.raises(ConfigError, match="more than"):
        cluster(np.zeros((3, 2), np.float32) + np.arange(3)[:, None], ClusterParams(k=5))
