"""Search engines under the index: exact top-k (faiss-cpu, faiss-gpu, or torch on any device) and the approximate
FAISS indexes (IVF-Flat, IVF-PQ, HNSW) with their build and search parameters.

Exact search semantics, the same for every backend: `metric="ip"` returns inner products, largest first;
`metric="l2"` squared Euclidean distances, smallest first; positions beyond the candidates hold index -1.
Approximate indexes always work in L2 space (on unit vectors its order is the cosine order); the index layer
re-scores their candidates exactly, so their scores match the exact ones.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import faiss
import numpy as np

from service.config import IndexConfig
from service.devices import resolve_device

logger = logging.getLogger(__name__)

SearchMetric = Literal["ip", "l2"]


def _faiss_metric(metric: SearchMetric) -> int:
    return int(faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)


def _pad(scores: np.ndarray, rows: np.ndarray, k: int, metric: SearchMetric) -> tuple[np.ndarray, np.ndarray]:
    """Widen (n_q, k') results to k columns with -1 rows and the worst possible score."""
    n_q, have = rows.shape
    if have >= k:
        return scores[:, :k], rows[:, :k]
    fill = -np.inf if metric == "ip" else np.inf
    out_scores = np.full((n_q, k), fill, dtype=np.float32)
    out_rows = np.full((n_q, k), -1, dtype=np.int64)
    out_scores[:, :have], out_rows[:, :have] = scores, rows
    return out_scores, out_rows


class ExactSearcher(Protocol):
    """Exact top-k of `queries` against `database` (or its `rows`), returning positions in `database`."""

    name: str

    def search(
        self,
        database: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        metric: SearchMetric,
        rows: np.ndarray | None = None,
        cache_key: str = "",
        version: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (n_q, k), positions int64 (n_q, k)) among `rows` of `database` (all when None).

        `cache_key` and `version` name the database contents, so that a device copy is reused while they do not
        change."""
        ...

    def evict(self, cache_key: str) -> None:
        """Forget any device copy of `cache_key`."""
        ...


class FaissExact:
    """Brute force with faiss on the CPU (`faiss.knn`: BLAS for the scores, a heap for the top k)."""

    name = "faiss-cpu"

    def search(
        self,
        database: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        metric: SearchMetric,
        rows: np.ndarray | None = None,
        cache_key: str = "",
        version: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        base = database if rows is None else database[rows]
        kk = min(k, base.shape[0])
        if kk == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k, metric)
        scores, found = self._knn(np.ascontiguousarray(queries), np.ascontiguousarray(base), kk, metric)
        found = found.astype(np.int64, copy=False)
        if rows is not None:
            found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        return _pad(scores.astype(np.float32, copy=False), found, k, metric)

    def _knn(
        self, queries: np.ndarray, base: np.ndarray, k: int, metric: SearchMetric
    ) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(queries, base, k, metric=_faiss_metric(metric))

    def evict(self, cache_key: str) -> None:
        return None


class _DeviceMirror:
    """One device copy of each database (by cache key), re-uploaded only when its version or row count changes.

    On the CPU the "copy" is a view of the numpy array (no data is copied).

        Thread-safe: index threads share it, and a search holds the tensor it got even if a newer version replaces it.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self._copies: dict[str, tuple[int, Any]] = {}
        self._lock = threading.Lock()

    def get(self, database: np.ndarray, cache_key: str, version: int) -> Any:
        import torch

        with self._lock:
            cached = self._copies.get(cache_key)
            if cached is None or cached[0] != version or cached[1].shape[0] != database.shape[0]:
                cached = (version, torch.from_numpy(np.ascontiguousarray(database)).to(self.device))
                self._copies[cache_key] = cached
            return cached[1]

    def evict(self, cache_key: str) -> None:
        with self._lock:
            self._copies.pop(cache_key, None)


def _subset(base: Any, rows: np.ndarray | None) -> Any:
    import torch

    return base if rows is None else base[torch.from_numpy(rows).to(base.device)]


def _to_positions(found: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    found = found.astype(np.int64, copy=False)
    return found if rows is None else np.where(found >= 0, rows[np.maximum(found, 0)], -1)


class TorchExact:
    """Blockwise exact top-k from `kernels.topk` (Triton on CUDA, plain torch elsewhere).

    On CUDA the database is mirrored on the device and re-uploaded only when its version changes.
    """

    def __init__(self, device: str, *, mirror: _DeviceMirror | None = None) -> None:
        import torch

        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"
        self._mirror = mirror or _DeviceMirror(self.device)

    def search(
        self,
        database: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        metric: SearchMetric,
        rows: np.ndarray | None = None,
        cache_key: str = "",
        version: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from kernels.topk import search_topk

        base = _subset(self._mirror.get(database, cache_key, version), rows)
        if base.shape[0] == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k, metric)
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
        scores_t, found_t = search_topk(q, base, k, metric)
        return scores_t.cpu().numpy(), _to_positions(found_t.cpu().numpy(), rows)

    def evict(self, cache_key: str) -> None:
        self._mirror.evict(cache_key)


GPU_MAX_SELECTION_K = 2048
"""Largest k faiss-gpu selects (`GPU_MAX_SELECTION_K`); above it `runDistance` fails a `FAISS_ASSERT`, which calls
`abort()` and kills the process, so larger k goes to the torch top-k."""


class GpuKnn(Protocol):
    """(resources, queries, database, k) -> (scores, positions), all device tensors (`faiss.knn_gpu`'s shape)."""

    def __call__(
        self, resources: Any, queries: Any, base: Any, k: int, *, metric: SearchMetric, device: int
    ) -> tuple[Any, Any]: ...


def _faiss_knn_gpu(
    resources: Any, queries: Any, base: Any, k: int, *, metric: SearchMetric, device: int
) -> tuple[Any, Any]:
    """`faiss.knn_gpu` on device tensors (no host copy of the database), on torch's current stream of `device`."""
    import faiss.contrib.torch_utils  # lets faiss.knn_gpu take torch tensors
    import torch

    with torch.cuda.device(device):
        return faiss.knn_gpu(resources, queries, base, k, metric=_faiss_metric(metric), device=device)


class FaissGpuExact:
    """Brute force with faiss-gpu (`knn_gpu`) on a resident device copy of each collection, for faiss GPU builds.

    The database stays on the GPU between searches (a numpy database would be copied to the device on every call);
    k above `GPU_MAX_SELECTION_K` goes to `TorchExact` on the same copy. faiss's GPU resources are not thread-safe
    (and a search re-points their stream at torch's), so one lock serialises the searches of the index threads: one
    GPU runs one brute-force search at a time anyway.
    """

    name = "faiss-gpu"

    def __init__(
        self,
        device: int | str = 0,
        *,
        knn: GpuKnn = _faiss_knn_gpu,
        resources: Callable[[], Any] | None = None,
    ) -> None:
        import torch

        self.device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        self.device_index = self.device.index if self.device.index is not None else 0
        self._knn = knn
        self._resources = (resources or faiss.StandardGpuResources)()
        self._lock = threading.Lock()
        self._mirror = _DeviceMirror(self.device)
        self.fallback = TorchExact(str(self.device), mirror=self._mirror)
        """Where k > GPU_MAX_SELECTION_K goes (the same device copy)."""

    def search(
        self,
        database: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        metric: SearchMetric,
        rows: np.ndarray | None = None,
        cache_key: str = "",
        version: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if k > GPU_MAX_SELECTION_K:
            return self.fallback.search(
                database, queries, k, metric=metric, rows=rows, cache_key=cache_key, version=version
            )
        base = _subset(self._mirror.get(database, cache_key, version), rows)
        kk = min(k, base.shape[0])
        if kk == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k, metric)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        with self._lock:
            scores_t, found_t = self._knn(
                self._resources, q, base.contiguous(), kk, metric=metric, device=self.device_index
            )
            scores, found = scores_t.cpu().numpy(), found_t.cpu().numpy()
        return _pad(scores.astype(np.float32, copy=False), _to_positions(found, rows), k, metric)

    def evict(self, cache_key: str) -> None:
        self._mirror.evict(cache_key)


def make_exact_searcher(cfg: IndexConfig) -> ExactSearcher:
    """The exact backend for `index.device` and `index.exact_backend` (see `IndexConfig`)."""
    device = str(resolve_device(cfg.device, what="index.device"))
    if device == "cpu":
        return TorchExact("cpu") if cfg.exact_backend == "torch" else FaissExact()
    gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if cfg.exact_backend in ("auto", "faiss") and gpu_faiss:
        return FaissGpuExact(device)
    if cfg.exact_backend == "faiss":
        logger.warning("index.exact_backend=faiss but this faiss has no GPU support; searching with torch on CUDA")
    return TorchExact(device)


# -- approximate indexes -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnnParams:
    """How an approximate index of one collection is built (fixed when the collection is created)."""

    index_type: str
    dim: int
    nlist: int
    pq_m: int
    pq_nbits: int
    hnsw_m: int
    ef_construction: int


def auto_nlist(n: int) -> int:
    """About 4 * sqrt(n) lists, with at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_ann(params: AnnParams, vectors: np.ndarray, ids: np.ndarray, *, seed: int = 1234) -> Any:
    """Train (on a sample) and fill an approximate index with `vectors` under `ids`."""
    n, dim = vectors.shape
    index: Any
    if params.index_type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_L2)
        hnsw.hnsw.efConstruction = params.ef_construction
        index = faiss.IndexIDMap(hnsw)
    else:
        nlist = params.nlist or auto_nlist(n)
        if params.index_type == "ivf_flat":
            index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_L2)
        elif params.index_type == "ivf_pq":
            index = faiss.index_factory(dim, f"IVF{nlist},PQ{params.pq_m}x{params.pq_nbits}", faiss.METRIC_L2)
            index.do_polysemous_training = False  # unused here (candidates are re-scored exactly), and slow
        else:
            raise ValueError(f"no approximate index of type {params.index_type!r}")
        wanted = max(64 * nlist, 64 * (1 << params.pq_nbits) if params.index_type == "ivf_pq" else 0)
        sample = vectors
        if n > wanted:
            pick = np.random.default_rng(seed).choice(n, size=wanted, replace=False)
            sample = vectors[np.sort(pick)]
        index.train(np.ascontiguousarray(sample))
    index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def filters_by_selector(index: Any) -> bool:
    """Whether `index` should restrict a search with an id selector (IVF: the scan checks each id cheaply), or be
    over-fetched and post-filtered (HNSW: a selector stops its graph walk early, and recall collapses)."""
    return not isinstance(index, faiss.IndexIDMap)


def ann_search(
    index: Any,
    queries: np.ndarray,
    k: int,
    *,
    allowed_ids: np.ndarray | None,
    id_space: int,
    nprobe: int,
    ef_search: int,
    widen: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(L2 distances, ids) of up to k candidates per query, only among `allowed_ids` when given.

    `widen` (the inverse of the fraction of items a filter keeps) multiplies `nprobe`, so that an IVF search visits
    about as many matching items with a filter as without one.
    """
    if isinstance(index, faiss.IndexIDMap):
        params: Any = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(ef_search, k)
    else:
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(int(index.nlist), math.ceil(nprobe * widen)))
    # The selector reads `bitmap` and `params` reads `selector` through raw pointers: both stay referenced here
    # until the search has returned.
    bitmap = selector = None
    if allowed_ids is not None:
        bits = np.zeros(max(id_space, 1), dtype=bool)
        bits[allowed_ids] = True
        bitmap = np.packbits(bits, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params.sel = selector
    distances, ids = index.search(np.ascontiguousarray(queries), k, params=params)
    return distances, ids.astype(np.int64, copy=False)
