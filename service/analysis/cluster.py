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

import importlib.util
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from service.analysis import evaluate
from service.devices import cuda_available, resolve_device
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


class ClusterInterruptedError(EmbedServeError):
    """The run was stopped between steps because its deadline passed or its caller went away."""


class BackendUnavailableError(EmbedServeError):
    """The requested backend cannot run here (package missing, no CUDA, or not for this algorithm)."""


# -- availability -------------------------------------------------------------------------------------------------


def backend_available(backend: str) -> tuple[bool, str]:
    """(available, why not) for one backend on this machine."""
    if backend == "cuml":
        if importlib.util.find_spec("cuml") is None:
            return False, "cuML is not installed (pip install -e '.[gpu]' on a CUDA machine)"
        if not cuda_available():
            return False, "cuML needs a CUDA GPU and none is visible"
        return True, ""
    if backend in ("torch", "faiss", "sklearn", "kmedoids"):
        module = {"torch": "torch", "faiss": "faiss", "sklearn": "sklearn", "kmedoids": "kmedoids"}[backend]
        if importlib.util.find_spec(module) is None:
            return False, f"the {module} package is not installed"
        return True, ""
    return False, f"unknown backend {backend!r}"


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

StopCheck = Callable[[], bool]


def _check(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise ClusterInterruptedError("clustering stopped: the deadline passed or the caller went away")


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
    p = params
    if p.k is not None and p.k > n:
        raise ConfigError(f"k={p.k} is more than the {n} vectors")
    backend = resolve_backend(p.algorithm, p.backend)
    if p.algorithm == "kmedoids" and n > KMEDOIDS_MAX_ITEMS:
        raise ConfigError(f"kmedoids holds an n×n distance matrix; {n} items is over {KMEDOIDS_MAX_ITEMS}, use kmeans")
    device = "cuda" if backend in _GPU_BACKENDS and cuda_available() else "cpu"
    if p.pca_dim is not None and p.pca_dim < x.shape[1]:
        x = _pca(x, p.pca_dim, p.seed, device)
    _check(should_stop)

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
            k_dist = k_distances(x, p.min_samples, device=device if backend == "torch" else "cpu")
    else:
        if p.algorithm == "dbscan" or p.curves:
            k_dist = k_distances(x, p.min_samples, device=device if backend == "torch" else "cpu")
        if p.algorithm == "dbscan":
            eps = p.eps if p.eps is not None else knee(k_dist if k_dist is not None else np.zeros(0))
            if eps <= 0:
                raise ConfigError("the automatic eps came out as 0 (many duplicate vectors); give eps explicitly")
            labels = _dbscan(x, eps, p.min_samples, backend)
        elif p.algorithm == "hdbscan":
            labels = _hdbscan(x, p, backend)
        else:
            labels = _optics(x, p)
        if p.curves:
            sweep_params = ClusterParams(algorithm="kmeans", seed=p.seed, k_min=p.k_min, k_max=p.k_max)
            sweep = _sweep(x, sweep_params, "auto", should_stop)
    _check(should_stop)
    labels = np.asarray(labels, dtype=np.int64)
    metrics = evaluate.unsupervised_metrics(x, labels, silhouette_sample=p.silhouette_sample, seed=p.seed)
    if inertia is not None:
        metrics["inertia"] = inertia
    if eps is not None:
        metrics["eps"] = eps
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
    )


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
    if backend == "torch":
        labels, centers = kmeans_torch(x, k, max_iter=p.max_iter, n_init=p.n_init, seed=p.seed, should_stop=should_stop)
    elif backend == "faiss":
        labels, centers = _kmeans_faiss(x, k, p)
    elif backend == "cuml":
        labels, centers = _kmeans_cuml(x, k, p)
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=p.n_init, max_iter=p.max_iter, random_state=p.seed).fit(x)
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


def pca_torch(x: np.ndarray, dim: int, *, device: str = "cpu") -> np.ndarray:
    """PCA in torch (eigenvectors of the float64 covariance): the first `dim` component scores, float32.

    Signs follow scikit-learn's convention (the largest loading of each component positive), so the result
    equals `PCA(dim).fit_transform(x)` within float tolerance.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).to(device, torch.float64)
    t = t - t.mean(dim=0)
    _, vecs = torch.linalg.eigh(t.T @ t)
    comps = vecs[:, -dim:].flip(1)
    signs = torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))
    return np.asarray((t @ (comps * signs)).float().cpu().numpy())


def k_distances(x: np.ndarray, k: int, *, device: str = "cpu") -> np.ndarray:
    """Sorted (ascending) euclidean distance of each point to its k-th nearest neighbour, the point itself first.

    With k = DBSCAN's `min_samples`, a point is a core point for any eps >= its k-distance.
    """
    import torch

    from kernels.topk import search_topk

    kk = min(k, x.shape[0])
    t = torch.from_numpy(x).to(device)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=device)
    chunk = 4096
    for start in range(0, x.shape[0], chunk):
        d2, _ = search_topk(t[start : start + chunk], t, kk, metric="l2")
        out[start : start + chunk] = d2[:, kk - 1]
    return np.sort(np.sqrt(out.cpu().numpy().astype(np.float64)))


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


# -- K-means --------------------------------------------------------------------------------------------------------


def kmeans_torch(
    x: np.ndarray,
    k: int,
    *,
    max_iter: int = 100,
    n_init: int = 4,
    seed: int = 0,
    tol: float = 1e-4,
    device: str | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's K-means in torch on the `kernels.kmeans` steps: (labels int64, centroids float32).

    k-means++ seeding from a CPU generator seeded with `seed` (so CUDA and CPU runs start alike); `n_init`
    restarts, the lowest inertia kept; stops when the centroids move less than `tol` × the mean feature
    variance (scikit-learn's criterion). An emptied cluster is re-seeded at the point farthest from its centroid.
    `device` defaults to CUDA when available.
    """
    import torch

    from kernels.kmeans import kmeans_assign, kmeans_update

    dev = resolve_device(device)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    n = t.shape[0]
    gen = torch.Generator().manual_seed(seed)
    threshold = tol * float(t.var(dim=0).mean()) if n > 1 else 0.0
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(n_init):
        _check(should_stop)
        centers = _kmeans_pp(t, k, gen)
        for it in range(max_iter):
            if it % 10 == 0:
                _check(should_stop)
            labels, dist = kmeans_assign(t, centers)
            new, counts = kmeans_update(t, labels, k, previous=centers)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():
                far = torch.topk(dist, int(empty.numel())).indices
                new[empty] = t[far]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= threshold:
                break
        labels, dist = kmeans_assign(t, centers)
        inertia = float(dist.double().sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centers)
    if best is None:  # n_init >= 1 is validated by ClusterParams; a direct caller may pass 0
        raise ConfigError("n_init must be >= 1")
    return best[1].cpu().numpy().astype(np.int64), best[2].float().cpu().numpy()


def _kmeans_pp(t: Any, k: int, gen: Any) -> Any:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance."""
    import torch

    from kernels.kmeans import kmeans_assign

    n = t.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = t[first : first + 1].clone()
    for _ in range(1, k):
        _, d2 = kmeans_assign(t, centers)
        w = d2.double().cpu()
        total = float(w.sum())
        idx = (
            int(torch.multinomial(w / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
        centers = torch.cat([centers, t[idx : idx + 1]])
    return centers


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


def dbscan_torch(
    x: np.ndarray, eps: float, min_samples: int, *, device: str | None = None, chunk: int = 2048
) -> np.ndarray:
    """DBSCAN in torch: batched radius search, then connected components of the core points.

    A point is a core point when at least `min_samples` points (itself included) lie within `eps` (euclidean,
    `<=` as scikit-learn). Core points within `eps` of each other share a cluster (min-label propagation with
    pointer jumping); a non-core point within `eps` of a core point joins the cluster of its nearest core
    neighbour; the rest are noise (-1). Clusters are numbered by their first core point, as scikit-learn does.
    Memory: the edges within `eps` are held (int64 pairs), plus a `chunk`×n distance block.
    """
    import torch

    dev = resolve_device(device)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    n = t.shape[0]
    sq = (t * t).sum(dim=1)
    eps2 = float(eps) ** 2
    rows, cols, dists = [], [], []
    counts = torch.zeros(n, dtype=torch.int64, device=dev)
    for start in range(0, n, chunk):
        xc = t[start : start + chunk]
        d2 = (sq[start : start + chunk, None] - 2.0 * (xc @ t.T) + sq[None, :]).clamp_min_(0.0)
        idx = torch.arange(start, start + xc.shape[0], device=dev)
        d2[torch.arange(xc.shape[0], device=dev), idx] = 0.0  # a point is at distance 0 from itself
        within = d2 <= eps2
        counts[start : start + chunk] = within.sum(dim=1)
        r, c = within.nonzero(as_tuple=True)
        rows.append(r + start)
        cols.append(c)
        dists.append(d2[r, c])
    r_all, c_all, d_all = torch.cat(rows), torch.cat(cols), torch.cat(dists)
    core = counts >= min_samples
    big = n
    labels = torch.where(core, torch.arange(n, device=dev), torch.full((n,), big, device=dev))
    both = core[r_all] & core[c_all]
    # Both directions, so that float rounding (d[i, j] vs d[j, i]) cannot make an edge one-way.
    er = torch.cat([r_all[both], c_all[both]])
    ec = torch.cat([c_all[both], r_all[both]])
    while True:
        new = labels.scatter_reduce(0, er, labels[ec], reduce="amin")
        new = torch.where(core, new[new.clamp_max(n - 1)].minimum(new), new)  # pointer jumping
        if torch.equal(new, labels):
            break
        labels = new
    # Border points: the cluster of the nearest core neighbour.
    border_edge = ~core[r_all] & core[c_all]
    br, bc, bd = r_all[border_edge], c_all[border_edge], d_all[border_edge]
    if br.numel():
        best = torch.full((n,), float("inf"), device=dev).scatter_reduce(0, br, bd, reduce="amin")
        is_best = bd <= best[br]
        # Ties (equal distances) go to the core neighbour with the smallest index.
        cand = torch.full((n,), big, dtype=torch.int64, device=dev).scatter_reduce(
            0, br[is_best], bc[is_best], reduce="amin"
        )
        has = cand < big
        labels = torch.where(has & ~core, labels[cand.clamp_max(n - 1)], labels)
    out = labels.cpu().numpy().astype(np.int64)
    out[out >= big] = evaluate.NOISE
    # Components carry their smallest core index; rank them in that order.
    mask = out != evaluate.NOISE
    uniq = np.unique(out[mask])
    out[mask] = np.searchsorted(uniq, out[mask])
    return out
