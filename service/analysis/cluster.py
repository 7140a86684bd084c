"""Clustering of embeddings: K-means, DBSCAN, HDBSCAN, OPTICS and K-medoids over interchangeable backends.

    result = cluster(vectors, ClusterParams(algorithm="kmeans", k=4), truth=labels)
    result.labels, result.centers, result.noise, result.backend, result.seconds, result.metrics

Backends, picked by `backend="auto"` in this order where the algorithm has one:

| backend    | where | algorithms                       | what                                                         |
|------------|-------|----------------------------------|--------------------------------------------------------------|
| `cuml`     | GPU   | kmeans, dbscan, hdbscan          | RAPIDS cuML (needs CUDA and the `cuml` package)              |
| `torch`    | GPU   | kmeans, dbscan                   | Lloyd on `kernels.kmeans`; DBSCAN: radius search+components |
| `faiss`    | CPU   | kmeans                           | `faiss.Kmeans`                                               |
| `sklearn`  | CPU   | kmeans, dbscan, hdbscan, optics  | scikit-learn                                                 |
| `kmedoids` | CPU   | kmedoids                         | the `kmedoids` package (FasterPAM)                           |

Any backend can be forced (`torch` also runs on CPU tensors, which is how it is tested without a GPU). Every
backend returns the same `ClusterResult`; cluster ids are 0..k-1 and noise is -1.

Choosing parameters: `k=None` sweeps `k_min..k_max` and keeps the k with the best silhouette (the whole curve,
with the inertia for an elbow plot, is in `result.sweep`); `eps=None` takes DBSCAN's radius at the knee of the
sorted k-distance curve (k = `min_samples`; the curve is in `result.k_distance`). Results are deterministic for
a given `seed` and backend. Long runs check `should_stop` between steps (sweep points, K-means restarts and
iterations) and raise `ClusterInterruptedError`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import time
from collections.abc import Sequence

import numpy as np

from service.analysis import evaluate
from service.analysis.density import (  # noqa: F401  (re-exported for callers of the cluster module)
    DEFAULT_N_INIT,
    DENSITY_ALGORITHMS,
    auto_pca_dim,
    default_min_cluster_size,
    default_min_samples,
    degenerate_warnings,
    is_degenerate,
    knee,
    resolve_params,
    robust_knee_candidates,
    unit_rows,
)
from service.analysis.torch_backend import (
    DBSCAN_MEMORY_BYTES,  # noqa: F401  (re-exported)
    ClusterInterruptedError,  # noqa: F401  (re-exported)
    StopCheck,
    _check,
    dbscan_torch,
    k_distances,
    kmeans_torch,
    pca_torch,
)
from service.devices import cuda_available
from service.errors import ConfigError, EmbedServeError
from service.types import (  # noqa: F401  (re-exported: the records live in service.types)
    ALGORITHMS,
    BACKENDS,
    Algorithm,
    BackendName,
    ClusterParams,
    ClusterResult,
    SweepPoint,
)

logger = logging.getLogger(__name__)


_GPU_BACKENDS = frozenset({"cuml", "torch"})
KMEDOIDS_MAX_ITEMS = 20_000
"""K-medoids holds the full n×n distance matrix; above this many items it is refused (use K-means)."""


class BackendUnavailableError(EmbedServeError):
    """The requested backend cannot run here (package missing, no CUDA, or not for this algorithm)."""


# -- availability -------------------------------------------------------------------------------------------------


def backend_available(backend: str) -> tuple[bool, str]:
    """(available, why not) for one backend on this machine."""
    if backend == "cuml":
        if importlib.util.find_spec("cuml") is None:
            return False, "cuML is not installed (pip install -e '.[gpu-cu13]' on a CUDA machine)"
        if not cuda_available():
            return False, "cuML needs a CUDA GPU and none is visible"
        broken = _cuml_import_error()
        if broken:
            return False, f"cuML is installed but does not import ({broken}); torch runs instead"
        return True, ""
    if backend in ("torch", "faiss", "sklearn", "kmedoids"):
        module = {"torch": "torch", "faiss": "faiss", "sklearn": "sklearn", "kmedoids": "kmedoids"}[backend]
        if importlib.util.find_spec(module) is None:
            return False, f"the {module} package is not installed"
        return True, ""
    return False, f"unknown backend {backend!r}"


@functools.cache
def _cuml_import_error() -> str:
    """Why `import cuml` fails here ('' when it works): a CUDA or RAPIDS mismatch must not break clustering."""
    try:
        import cuml  # noqa: F401
    except Exception as e:  # any failure of a native stack at import (ImportError, RuntimeError, OSError, ...)
        logger.warning("cuML does not import (%s: %s); clustering falls back to the next backend", type(e).__name__, e)
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
    return ""


def resolve_backend(algorithm: str, backend: str = "auto") -> str:
    """The backend that will run `algorithm`: the requested one (checked), or the first available for `auto`.

    `auto` only picks a GPU backend (cuml, torch) when CUDA is available.
    """
    if algorithm not in BACKENDS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if backend != "auto":
        if backend not in BACKENDS[algorithm]:
            raise BackendUnavailableError(f"backend {backend!r} has no {algorithm}")
        ok, why = backend_available(backend)
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
        return backend
    gpu = cuda_available()
    reasons = []
    for name in BACKENDS[algorithm]:
        if name in _GPU_BACKENDS and not gpu:
            reasons.append(f"{name}: no CUDA GPU")
            continue
        ok, why = backend_available(name)
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise BackendUnavailableError(f"no backend can run {algorithm} here ({'; '.join(reasons)})")


# -- entry point ----------------------------------------------------------------------------------------------------


def _check_density_params(p: ClusterParams, n: int) -> None:
    """Refuse neighbourhood sizes the data cannot have (scikit-learn would fail deep inside with a ValueError)."""
    if p.min_samples is not None and p.min_samples > n:
        raise ConfigError(f"min_samples={p.min_samples} is more than the {n} vectors; use at most {n}")
    if p.min_cluster_size is not None and p.min_cluster_size > n:
        raise ConfigError(f"min_cluster_size={p.min_cluster_size} is more than the {n} vectors; use at most {n}")


def cluster(
    vectors: np.ndarray,
    params: ClusterParams,
    *,
    truth: Sequence[str] | None = None,
    should_stop: StopCheck | None = None,
) -> ClusterResult:
    """Cluster the rows of `vectors` (float, (n, d)) as `params` says; with `truth`, also score against it.

    Raises ConfigError for parameters the data cannot satisfy, BackendUnavailableError when the backend cannot
    run here and ClusterInterruptedError when `should_stop()` turns true between steps.
    """
    started = time.perf_counter()
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2:
        raise ConfigError(f"vectors must be 2-D (n, d), got shape {x.shape}")
    n = x.shape[0]
    if n < 2:
        raise ConfigError(f"clustering needs at least 2 vectors, got {n}")
    if not np.isfinite(x).all():
        raise ConfigError("vectors contain NaN or infinity")
    if truth is not None and len(truth) != n:
        raise ConfigError(f"{len(truth)} ground-truth values for {n} vectors")
    p = resolve_params(params, n, x.shape[1])
    if p.k is not None and p.k > n:
        raise ConfigError(f"k={p.k} is more than the {n} vectors")
    _check_density_params(p, n)
    backend = resolve_backend(p.algorithm, p.backend)
    if p.algorithm == "kmedoids" and n > KMEDOIDS_MAX_ITEMS:
        raise ConfigError(f"kmedoids holds an n×n distance matrix; {n} items is over {KMEDOIDS_MAX_ITEMS}, use kmeans")
    device = "cuda" if backend in _GPU_BACKENDS and cuda_available() else "cpu"
    density = p.algorithm in DENSITY_ALGORITHMS
    if density and p.metric == "cosine":
        x = unit_rows(x)
    if p.pca_dim and p.pca_dim < x.shape[1]:
        x = _pca(x, p.pca_dim, p.seed, device)
        if density and p.metric == "cosine":
            x = unit_rows(x)
    _check(should_stop)
    curve_k = p.min_samples if p.min_samples is not None else default_min_samples(n)

    sweep: list[SweepPoint] = []
    k_dist: np.ndarray | None = None
    eps: float | None = None
    k: int | None = None
    centers: np.ndarray | None = None
    medoids: np.ndarray | None = None
    inertia: float | None = None
    if p.algorithm in ("kmeans", "kmedoids"):
        if p.k is None or p.curves:
            sweep = _sweep(x, p, backend, should_stop)
        if p.k is None:
            if not sweep:
                raise ConfigError(f"the k sweep {p.k_min}..{p.k_max} is empty for {n} vectors")
            defined = [s for s in sweep if not math.isnan(s.silhouette)]
            k = max(defined, key=lambda s: (s.silhouette, -s.k)).k if defined else sweep[0].k
        else:
            k = p.k
        labels, centers, medoids, inertia = _fit_centroids(x, k, p, backend, should_stop)
        if p.curves:
            k_dist = k_distances(x, curve_k, device=device)
    else:
        if p.algorithm == "dbscan" or p.curves:
            # On a GPU backend (torch or cuML) the k-distance curve (eps=auto) is computed on the GPU too.
            k_dist = k_distances(x, curve_k, device=device)
        if p.algorithm == "dbscan":
            if p.eps is not None:
                eps = p.eps
                labels = _dbscan(x, eps, curve_k, backend)
            else:
                eps, labels = _dbscan_auto_eps(x, k_dist if k_dist is not None else np.zeros(0), p, backend)
        elif p.algorithm == "hdbscan":
            labels = _hdbscan(x, p, backend)
        else:
            labels = _optics(x, p)
        if p.curves:
            sweep_params = resolve_params(
                ClusterParams(algorithm="kmeans", seed=p.seed, k_min=p.k_min, k_max=p.k_max), n, x.shape[1]
            )
            sweep = _sweep(x, sweep_params, "auto", should_stop)
    _check(should_stop)
    labels = np.asarray(labels, dtype=np.int64)
    metrics = evaluate.unsupervised_metrics(x, labels, silhouette_sample=p.silhouette_sample, seed=p.seed)
    if inertia is not None:
        metrics["inertia"] = inertia
    if eps is not None:
        metrics["eps"] = eps
    warnings = degenerate_warnings(labels, p, eps=eps, k_distance=k_dist) if density else []
    for w in warnings:
        logger.warning("%s", w)
    table = None
    if truth is not None:
        metrics |= evaluate.supervised_metrics(truth, labels)
        table = evaluate.contingency(truth, labels)
    seconds = time.perf_counter() - started
    logger.info(
        "%s on %s: %d vectors -> %d clusters in %.3f s", p.algorithm, backend, n, metrics["n_clusters"], seconds
    )
    return ClusterResult(
        algorithm=p.algorithm,
        backend=backend,
        labels=labels,
        noise=labels == evaluate.NOISE,
        centers=None if centers is None else centers.astype(np.float32),
        medoids=medoids,
        seconds=seconds,
        metrics=metrics,
        params=p,
        k=k,
        eps=eps,
        sweep=sweep,
        k_distance=k_dist,
        table=table,
        features=x,
        warnings=warnings,
    )


def _dbscan_auto_eps(x: np.ndarray, curve: np.ndarray, p: ClusterParams, backend: str) -> tuple[float, np.ndarray]:
    """DBSCAN at a robust knee: of `robust_knee_candidates`, the one whose clustering is not degenerate and has
    the best silhouette; when all are degenerate (a curve without a knee), the first non-degenerate of the curve's
    90th, 80th, ..., 50th percentiles; else the plain knee (and the result says it is degenerate)."""
    candidates = robust_knee_candidates(curve)
    if not candidates:
        raise ConfigError("the automatic eps came out as 0 (many duplicate vectors); give eps explicitly")
    ms = p.min_samples if p.min_samples is not None else default_min_samples(x.shape[0])
    best: tuple[float, float, np.ndarray] | None = None
    first: tuple[float, np.ndarray] | None = None
    for eps in candidates:
        labels = _dbscan(x, eps, ms, backend)
        if first is None:
            first = (eps, labels)
        if is_degenerate(labels):
            continue
        sil = evaluate.silhouette(x, labels, sample_size=p.silhouette_sample, seed=p.seed)
        score = -1.0 if sil is None else sil
        if best is None or score > best[0]:
            best = (score, eps, labels)
    if best is not None:
        return best[1], best[2]
    for q in (0.9, 0.8, 0.7, 0.6, 0.5):
        eps = float(np.quantile(curve, q))
        if eps <= 0:
            break
        labels = _dbscan(x, eps, ms, backend)
        if not is_degenerate(labels):
            return eps, labels
    assert first is not None
    return first


def _sweep(x: np.ndarray, p: ClusterParams, backend: str, should_stop: StopCheck | None) -> list[SweepPoint]:
    """Fit every k of k_min..min(k_max, n-1) and score it (silhouette and inertia)."""
    if backend == "auto":
        backend = resolve_backend(p.algorithm)
    out = []
    for k in range(p.k_min, min(p.k_max, x.shape[0] - 1) + 1):
        _check(should_stop)
        labels, _, _, inertia = _fit_centroids(x, k, p, backend, should_stop)
        sil = evaluate.silhouette(x, labels, sample_size=p.silhouette_sample, seed=p.seed)
        out.append(SweepPoint(k=k, silhouette=float("nan") if sil is None else sil, inertia=inertia))
    return out


def _fit_centroids(
    x: np.ndarray, k: int, p: ClusterParams, backend: str, should_stop: StopCheck | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """(labels, centers, medoid indices or None, inertia) of K-means or K-medoids with `k` clusters."""
    if p.algorithm == "kmedoids":
        return _kmedoids(x, k, p)
    n_init = p.n_init if p.n_init is not None else DEFAULT_N_INIT
    if backend == "torch":
        labels, centers = kmeans_torch(x, k, max_iter=p.max_iter, n_init=n_init, seed=p.seed, should_stop=should_stop)
    elif backend == "faiss":
        labels, centers = _kmeans_faiss(x, k, p)
    elif backend == "cuml":
        labels, centers = _kmeans_cuml(x, k, p)
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=n_init, max_iter=p.max_iter, random_state=p.seed).fit(x)
        labels, centers = km.labels_, km.cluster_centers_
    labels, centers = _canonical(np.asarray(labels, np.int64), np.asarray(centers, np.float32))
    inertia = float(((x - centers[labels]) ** 2).sum())
    return labels, centers, None, inertia


def _canonical(labels: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by their first member (so equal partitions get equal ids); drop empty clusters."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    remap = np.full(centers.shape[0], -1, dtype=np.int64)
    remap[order] = np.arange(order.shape[0])
    return remap[labels], centers[order]


# -- PCA and k-distances --------------------------------------------------------------------------------------------


def _pca(x: np.ndarray, dim: int, seed: int, device: str) -> np.ndarray:
    return evaluate.pca_reduce(x, dim, seed=seed) if device == "cpu" else pca_torch(x, dim, device=device)


# -- K-means --------------------------------------------------------------------------------------------------------


def _kmeans_faiss(x: np.ndarray, k: int, p: ClusterParams) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=p.max_iter,
        nredo=p.n_init,
        seed=p.seed,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, x.shape[0]),  # no subsampling: cluster every point
        verbose=False,
    )
    km.train(x)
    _, idx = km.index.search(x, 1)
    return idx[:, 0].astype(np.int64), np.asarray(km.centroids, np.float32)


def _kmeans_cuml(x: np.ndarray, k: int, p: ClusterParams) -> tuple[np.ndarray, np.ndarray]:
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=k, max_iter=p.max_iter, n_init=p.n_init, random_state=p.seed, output_type="numpy")
    km.fit(x)
    return np.asarray(km.labels_, np.int64), np.asarray(km.cluster_centers_, np.float32)


def _kmedoids(x: np.ndarray, k: int, p: ClusterParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    import kmedoids

    d = evaluate._pairwise(x.astype(np.float64), x.astype(np.float64))
    km = kmedoids.KMedoids(
        k, metric="precomputed", method="fasterpam", init="build", max_iter=p.max_iter, random_state=p.seed
    )
    km.fit(d)
    medoids = np.asarray(km.medoid_indices_, np.int64)
    labels = np.asarray(km.labels_, np.int64)
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    remap = np.full(k, -1, dtype=np.int64)
    remap[order] = np.arange(order.shape[0])
    medoids = medoids[order]
    labels = remap[labels]
    inertia = float((d[np.arange(x.shape[0]), medoids[labels]] ** 2).sum())
    return labels, x[medoids].astype(np.float32), medoids, inertia


# -- density-based ----------------------------------------------------------------------------------------------------


def _dbscan(x: np.ndarray, eps: float, min_samples: int, backend: str) -> np.ndarray:
    if backend == "torch":
        return dbscan_torch(x, eps, min_samples)
    if backend == "cuml":
        from cuml.cluster import DBSCAN as CUML_DBSCAN

        # Caps the pairwise-distance working set so that 80k+ vectors fit next to the model.
        db = CUML_DBSCAN(eps=eps, min_samples=min_samples, max_mbytes_per_batch=2048, output_type="numpy")
        return _renumber_density(np.asarray(db.fit_predict(x), np.int64))
    from sklearn.cluster import DBSCAN

    return _renumber_density(np.asarray(DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x), np.int64))


def _hdbscan(x: np.ndarray, p: ClusterParams, backend: str) -> np.ndarray:
    if backend == "cuml":
        from cuml.cluster.hdbscan import HDBSCAN as CUML_HDBSCAN

        h = CUML_HDBSCAN(min_cluster_size=p.min_cluster_size, min_samples=p.min_samples, output_type="numpy")
        return _renumber_density(np.asarray(h.fit_predict(x), np.int64))
    from sklearn.cluster import HDBSCAN

    h = HDBSCAN(min_cluster_size=p.min_cluster_size, min_samples=p.min_samples, copy=True)
    return _renumber_density(np.asarray(h.fit_predict(x), np.int64))


def _optics(x: np.ndarray, p: ClusterParams) -> np.ndarray:
    from sklearn.cluster import OPTICS

    o = OPTICS(min_samples=p.min_samples, min_cluster_size=p.min_cluster_size)
    return _renumber_density(np.asarray(o.fit_predict(x), np.int64))


def _renumber_density(labels: np.ndarray) -> np.ndarray:
    """Clusters renumbered 0.. by first member; noise stays -1."""
    out = np.full_like(labels, evaluate.NOISE)
    mask = labels != evaluate.NOISE
    if mask.any():
        _, first = np.unique(labels[mask], return_index=True)
        order = labels[mask][np.sort(first)]
        remap = {int(c): i for i, c in enumerate(order)}
        out[mask] = [remap[int(c)] for c in labels[mask]]
    return out
