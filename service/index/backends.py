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
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import faiss
import numpy as np

from service.config import IndexConfig
from service.devices import cuda_available
from service.errors import ConfigError

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


class FaissGpuExact(FaissExact):
    """Brute force with faiss-gpu (`faiss.knn_gpu`), for builds of faiss with GPU support."""

    name = "faiss-gpu"

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.resources = faiss.StandardGpuResources()

    def _knn(
        self, queries: np.ndarray, base: np.ndarray, k: int, metric: SearchMetric
    ) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn_gpu(self.resources, queries, base, k, metric=_faiss_metric(metric), device=self.device)


class TorchExact:
    """Blockwise exact top-k from `kernels.topk` (Triton on CUDA, plain torch elsewhere).

    On CUDA the database is mirrored on the device and re-uploaded only when its version changes.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"
        self._mirrors: dict[str, tuple[int, Any]] = {}

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

        if self.device.type == "cpu":
            base = torch.from_numpy(database)
        else:
            cached = self._mirrors.get(cache_key)
            if cached is None or cached[0] != version or cached[1].shape[0] != database.shape[0]:
                cached = (version, torch.from_numpy(database).to(self.device))
                self._mirrors[cache_key] = cached
            base = cached[1]
        if rows is not None:
            base = base[torch.from_numpy(rows).to(self.device)]
        if base.shape[0] == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k, metric)
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
        scores_t, found_t = search_topk(q, base, k, metric)
        scores, found = scores_t.cpu().numpy(), found_t.cpu().numpy().astype(np.int64, copy=False)
        if rows is not None:
            found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        return scores, found

    def evict(self, cache_key: str) -> None:
        self._mirrors.pop(cache_key, None)


def make_exact_searcher(cfg: IndexConfig) -> ExactSearcher:
    """The exact backend for `index.device` and `index.exact_backend` (see `IndexConfig`)."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    elif device == "cuda" and not cuda_available():
        raise ConfigError("index.device=cuda but no CUDA GPU is visible to torch; use index.device=cpu or auto")
    if device == "cpu":
        return TorchExact("cpu") if cfg.exact_backend == "torch" else FaissExact()
    gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if cfg.exact_backend in ("auto", "faiss") and gpu_faiss:
        return FaissGpuExact()
    if cfg.exact_backend == "faiss":
        logger.warning("index.exact_backend=faiss but this faiss has no GPU support; searching with torch on CUDA")
    return TorchExact("cuda")


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
