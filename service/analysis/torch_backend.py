"""The torch implementations of the clustering steps (CUDA or CPU tensors): PCA, k-distances, K-means with
k-means++ seeding, and DBSCAN in memory-bounded blocks. `service.analysis.cluster` chooses and calls them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

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
from service.devices import resolve_device
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


class ClusterInterruptedError(EmbedServeError):
    """The run was stopped between steps because its deadline passed or its caller went away."""


StopCheck = Callable[[], bool]
"""Called between steps; True stops the run with `ClusterInterruptedError`."""


def _check(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise ClusterInterruptedError("clustering stopped: the deadline passed or the caller went away")


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
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance.

    Keeps each point's squared distance to its nearest chosen centre and updates it with the newest centre only:
    O(n·d) per step, O(n·d·k) in all (recomputing against every chosen centre would be O(n·d·k²)).
    """
    import torch

    n = t.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    sq = (t * t).sum(dim=1)
    nearest = _sq_dist_to(t, sq, t[first])
    for _ in range(1, k):
        w = nearest.double().cpu()
        total = float(w.sum())
        idx = (
            int(torch.multinomial(w / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
        chosen.append(idx)
        nearest = torch.minimum(nearest, _sq_dist_to(t, sq, t[idx]))
    return t[torch.tensor(chosen, device=t.device)].clone()


def _sq_dist_to(t: Any, sq: Any, c: Any) -> Any:
    """Squared euclidean distance of every row of `t` (squared norms `sq`) to the vector `c`: one matrix-vector
    product, no n×d temporary."""
    return (sq - 2.0 * (t @ c) + (c * c).sum()).clamp_min_(0.0)


DBSCAN_MEMORY_BYTES = 1 << 30
"""Device memory the torch DBSCAN may use for one block of distances (and the pairs found in it)."""

_DBSCAN_BYTES_PER_CELL = 24  # float32 distance + bool mask + an int64 (row, col) pair in the worst case
_DBSCAN_MIN_ROWS = 16


def dbscan_torch(
    x: np.ndarray,
    eps: float,
    min_samples: int,
    *,
    device: str | None = None,
    chunk: int = 2048,
    memory_bytes: int = DBSCAN_MEMORY_BYTES,
) -> np.ndarray:
    """DBSCAN in torch in bounded memory: two passes of blockwise radius search, never the whole edge list.

    A point is a core point when at least `min_samples` points (itself included) lie within `eps` (euclidean,
    `<=` as scikit-learn). Core points within `eps` of each other share a cluster; a non-core point within `eps`
    of a core point joins the cluster of its nearest core neighbour (ties: the lower index); the rest are noise
    (-1). Clusters are numbered by their first core point, as scikit-learn does.

    Pass 1 counts neighbours per point; pass 2 merges each block's core-core pairs into a union-find forest (roots
    are the smallest index of their component) and assigns the block's border points. Memory: the data, O(n)
    labels, and one block of rows × n cells (`memory_bytes` bounds it; `chunk` caps the rows). Raises ConfigError
    when not even a block of 16 rows fits in `memory_bytes`.
    """
    import torch

    dev = resolve_device(device)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    n = t.shape[0]
    rows_fit = memory_bytes // max(1, n * _DBSCAN_BYTES_PER_CELL)
    if rows_fit < _DBSCAN_MIN_ROWS:
        need = _DBSCAN_MIN_ROWS * n * _DBSCAN_BYTES_PER_CELL
        raise ConfigError(
            f"torch DBSCAN over {n} vectors needs blocks of at least {need / 2**20:.0f} MiB, more than its "
            f"{memory_bytes / 2**20:.0f} MiB budget; reduce the vectors (a subset of keys, pca_dim) or use the "
            "cuml or sklearn backend"
        )
    step = max(1, min(chunk, rows_fit))
    sq = (t * t).sum(dim=1)
    eps2 = float(eps) ** 2

    def block(start: int) -> Any:
        xc = t[start : start + step]
        d2 = (sq[start : start + step, None] - 2.0 * (xc @ t.T) + sq[None, :]).clamp_min_(0.0)
        d2[torch.arange(xc.shape[0], device=dev), torch.arange(start, start + xc.shape[0], device=dev)] = 0.0
        return d2

    counts = torch.empty(n, dtype=torch.int64, device=dev)
    for start in range(0, n, step):
        counts[start : start + step] = (block(start) <= eps2).sum(dim=1)
    core = counts >= min_samples
    parent = torch.arange(n, device=dev)
    nearest_core = torch.full((n,), -1, dtype=torch.int64, device=dev)
    for start in range(0, n, step):
        d2 = block(start)
        within = d2 <= eps2
        row_core = core[start : start + step]
        r, c = (within & row_core[:, None] & core[None, :]).nonzero(as_tuple=True)
        parent = _union(parent, r + start, c)
        # Border points of this block: the nearest core point within eps (argmin keeps the lowest index on ties).
        border = (~row_core).nonzero().flatten()
        if border.numel():
            db = d2[border].masked_fill_(~(within[border] & core[None, :]), float("inf"))
            best, arg = db.min(dim=1)
            nearest_core[border + start] = torch.where(torch.isfinite(best), arg, torch.full_like(arg, -1))
    root = _compress(parent)
    labels = torch.where(core, root, torch.full_like(root, -1))
    has = ~core & (nearest_core >= 0)
    labels = torch.where(has, root[nearest_core.clamp_min(0)], labels)
    out = labels.cpu().numpy().astype(np.int64)
    mask = out != evaluate.NOISE
    # Components carry their smallest core index; rank them in that order.
    out[mask] = np.searchsorted(np.unique(out[mask]), out[mask])
    out[~mask] = evaluate.NOISE
    return out


def _compress(parent: Any) -> Any:
    """Every node pointed at its root (pointer jumping until nothing changes)."""
    import torch

    while True:
        up = parent[parent]
        if torch.equal(up, parent):
            return parent
        parent = up


def _union(parent: Any, a: Any, b: Any) -> Any:
    """Merge the components of each pair (a[i], b[i]); the larger root is pointed at the smaller one."""
    while a.numel():
        parent = _compress(parent)
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not bool(apart.any()):
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        parent = parent.scatter_reduce(0, ra.maximum(rb), ra.minimum(rb), reduce="amin")
    return parent
