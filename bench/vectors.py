"""The bench stages over embeddings: the k=10 kNN graph and clustering, on every backend this machine has.

Each stage is planned first (`knn_plan`, `cluster_plan`): one `Variant` per backend, with the reason it cannot run
here when it cannot (no CUDA GPU, faiss without GPU support, cuML missing). The CPU backends (faiss, scikit-learn)
run everywhere; on a CUDA machine the GPU backends run too: the torch top-k (Triton) and faiss-gpu for the kNN
graph, torch and cuML for K-means and DBSCAN, cuML for HDBSCAN. Skipped variants go to the results document's
`skipped` list with their reason, not into the stages.

Baselines: scikit-learn (brute-force neighbours, KMeans with the same iterations) for the exact searches and
K-means; the exact search of the first backend that ran for the approximate indexes; scikit-learn's DBSCAN and
HDBSCAN for the GPU ones. Every GPU variant runs once on a small slice first, so Triton compiles and CUDA context
set-up are not timed; the timed run starts from host arrays and ends with host arrays, as a caller's would.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.run import Stage, _measure

K = 10
KMEANS_ITERATIONS = 20
KMEANS_KS = (4, 100, 1000)
DBSCAN_MIN_SAMPLES = 10
HDBSCAN_MIN_CLUSTER_SIZE = 25
NO_CUDA = "needs a CUDA GPU (none visible)"


@dataclass(frozen=True, slots=True)
class Variant:
    """One backend of one stage, and whether it runs here."""

    stage: str
    """The stage name in the results, e.g. `kNN graph k=10 / torch top-k cuda (exact)`."""
    backend: str
    """faiss-cpu, hnsw, ivf, torch, faiss-gpu, faiss, cuml, sklearn."""
    device: str
    """cpu or cuda: where the backend computes (the torch backends run on either)."""
    skip: str = ""
    """Why it cannot run here; empty when it can."""

    @property
    def runs(self) -> bool:
        return not self.skip


def _missing(module: str) -> str:
    return "" if importlib.util.find_spec(module) is not None else f"the {module} package is not installed"


def _faiss_gpu_reason(device: torch.device) -> str:
    if device.type != "cuda":
        return NO_CUDA
    if _missing("faiss"):
        return "faiss is not installed (faiss-gpu needs its own wheels)"
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return "this faiss build has no GPU support (faiss-cpu)"
    return ""


def _cuml_reason(device: torch.device) -> str:
    if device.type != "cuda":
        return NO_CUDA
    from service.analysis.cluster import backend_available

    ok, why = backend_available("cuml")
    return "" if ok else why


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: 4·sqrt(n), at least 1 and at most 4096."""
    return max(1, min(4096, int(4 * np.sqrt(n))))


def knn_plan(device: torch.device, n: int) -> list[Variant]:
    """The kNN-graph variants over n vectors, the CPU ones first (the first exact one is the others' truth)."""
    prefix = f"kNN graph k={K} / "
    faiss_cpu = _missing("faiss")
    cuda = "" if device.type == "cuda" else NO_CUDA
    return [
        Variant(prefix + "faiss flat (exact)", "faiss-cpu", "cpu", faiss_cpu),
        Variant(prefix + "faiss hnsw M=32 efSearch=64", "hnsw", "cpu", faiss_cpu),
        Variant(prefix + f"faiss ivf-flat nlist={nlist_for(n)} nprobe=16", "ivf", "cpu", faiss_cpu),
        Variant(prefix + "torch top-k cuda (exact)", "torch", "cuda", cuda),
        Variant(prefix + "faiss-gpu flat (exact)", "faiss-gpu", "cuda", _faiss_gpu_reason(device)),
    ]


def cluster_plan(device: torch.device, n: int) -> list[Variant]:
    """The clustering variants over n vectors: K-means for each k of `KMEANS_KS` that n can hold, DBSCAN, HDBSCAN."""
    cuda = "" if device.type == "cuda" else NO_CUDA
    cuml = _cuml_reason(device)
    plan: list[Variant] = []
    for k in KMEANS_KS:
        if k * 4 > n:
            continue
        plan += [
            Variant(f"k-means k={k} / faiss", "faiss", "cpu", _missing("faiss")),
            Variant(f"k-means k={k} / torch cuda", "torch", "cuda", cuda),
            Variant(f"k-means k={k} / cuml", "cuml", "cuda", cuml),
        ]
    dbscan, hdbscan = "DBSCAN eps=auto", f"HDBSCAN min_cluster_size={HDBSCAN_MIN_CLUSTER_SIZE}"
    plan += [
        Variant(f"{dbscan} / scikit-learn", "sklearn", "cpu", _missing("sklearn")),
        Variant(f"{dbscan} / torch cuda", "torch", "cuda", cuda),
        Variant(f"{dbscan} / cuml", "cuml", "cuda", cuml),
        Variant(f"{hdbscan} / scikit-learn", "sklearn", "cpu", _missing("sklearn")),
        Variant(f"{hdbscan} / cuml", "cuml", "cuda", cuml),
    ]
    return plan


def skipped(plan: Sequence[Variant]) -> list[dict[str, str]]:
    """The variants of `plan` that cannot run here, as the results document lists them."""
    return [{"stage": v.stage, "reason": v.skip} for v in plan if not v.runs]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of each point's k true neighbours (itself excluded: column 0) found among its k."""
    hits = sum(len(set(f[1:]) & set(t[1:])) for f, t in zip(found, truth, strict=True))
    return hits / (len(found) * k)


# -- kNN graph ------------------------------------------------------------------------------------------------------


def _exact_searcher(variant: Variant) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    """(database, queries, k) -> positions (n_q, k) for one exact variant."""
    device = torch.device(variant.device)
    if variant.backend == "faiss-cpu":
        import faiss

        def faiss_flat(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
            index = faiss.IndexFlatIP(db.shape[1])
            index.add(db)
            return np.asarray(index.search(q, k)[1])

        return faiss_flat
    if variant.backend == "torch":
        from kernels.topk import search_topk

        def torch_topk(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
            base = torch.from_numpy(db).to(device)
            queries = base if q is db else torch.from_numpy(q).to(device)
            return search_topk(queries, base, k, "ip")[1].cpu().numpy()

        return torch_topk
    if variant.backend == "faiss-gpu":
        from service.index.backends import FaissGpuExact

        searcher = FaissGpuExact(str(device))

        def faiss_gpu(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
            try:
                return searcher.search(db, q, k, metric="ip", cache_key="bench", version=1)[1]
            finally:
                searcher.evict("bench")  # the next timed run uploads the database again, as a new one would

        return faiss_gpu
    raise ValueError(f"{variant.backend!r} is not an exact kNN backend")


def _ann(variant: Variant, dim: int, n: int) -> Any:
    import faiss

    if variant.backend == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 64
        return hnsw
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist_for(n), faiss.METRIC_INNER_PRODUCT)
    ivf.nprobe = 16
    return ivf


def _sklearn_knn_seconds(vectors: np.ndarray, k: int) -> float | None:
    """scikit-learn brute force, timed on up to 20,000 queries and scaled to all; None without scikit-learn."""
    if _missing("sklearn"):
        return None
    from sklearn.neighbors import NearestNeighbors

    n = len(vectors)
    limit = min(n, 20_000)
    start = time.perf_counter()
    NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(vectors).kneighbors(vectors[:limit])
    return (time.perf_counter() - start) * n / limit


def bench_knn(vectors: np.ndarray, plan: Sequence[Variant], *, baseline: bool = True) -> list[Stage]:
    """The kNN graph (k=10, every vector a query) on each variant of `plan` that runs here.

    Exact variants are compared with scikit-learn brute force (`baseline`), approximate ones with the first exact
    variant that ran; every variant reports its recall@10 against that first exact one (`truth` names it).
    """
    n, dim = vectors.shape
    k = min(K, n - 1)
    exact_base = _sklearn_knn_seconds(vectors, k) if baseline else None
    stages: list[Stage] = []
    truth: np.ndarray | None = None
    truth_name = ""
    exact_seconds: float | None = None
    for variant in (v for v in plan if v.runs):
        exact = variant.backend in ("faiss-cpu", "torch", "faiss-gpu")
        if exact:
            base, base_name = (exact_base, "scikit-learn brute force") if exact_base is not None else (None, "")
        else:
            truth_label = truth_name.split(" / ", 1)[-1]
            base, base_name = (exact_seconds, truth_label) if exact_seconds is not None else (None, "")
        stage = Stage(variant.stage, "seconds", 0.0, base, base_name, higher_is_better=False, images=n)
        if exact:
            search = _exact_searcher(variant)
            if variant.device == "cuda":
                search(vectors[: min(n, 512)], vectors[: min(n, 64)], k + 1)  # compile, allocate: not timed
                _sync()
            with _measure(stage):
                start = time.perf_counter()
                found = search(vectors, vectors, k + 1)
                stage.value = time.perf_counter() - start
        else:
            with _measure(stage):
                start = time.perf_counter()
                index = _ann(variant, dim, n)
                if not index.is_trained:
                    index.train(vectors)
                index.add(vectors)
                found = np.asarray(index.search(vectors, k + 1)[1])
                stage.value = time.perf_counter() - start
        if truth is None and exact:
            truth, truth_name, exact_seconds = found, variant.stage, stage.value
        stage.details = {"device": variant.device, "truth": truth_name}
        if truth is not None:
            stage.details["recall_at_10"] = _recall(found, truth, k)
        if exact and exact_base is not None:
            stage.details["scaled_from_queries"] = min(n, 20_000)
        stages.append(stage)
    return stages


# -- clustering -----------------------------------------------------------------------------------------------------


def _inertia(x: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> float:
    return float(((x - centres[labels]) ** 2).sum(dtype=np.float64))


def _kmeans(variant: Variant, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) after `KMEANS_ITERATIONS` Lloyd iterations, one initialisation."""
    if variant.backend == "faiss":
        import faiss

        km = faiss.Kmeans(
            x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1, max_points_per_centroid=10**9
        )
        km.train(x)
        return np.asarray(km.index.search(x, 1)[1][:, 0]), np.asarray(km.centroids)
    if variant.backend == "torch":
        from service.analysis.torch_backend import kmeans_torch

        return kmeans_torch(x, k, max_iter=KMEANS_ITERATIONS, n_init=1, seed=seed, tol=0.0, device=variant.device)
    if variant.backend == "cuml":
        from cuml.cluster import KMeans

        km = KMeans(n_clusters=k, max_iter=KMEANS_ITERATIONS, n_init=1, tol=0.0, random_state=seed, output_type="numpy")
        km.fit(x)
        return np.asarray(km.labels_, np.int64), np.asarray(km.cluster_centers_, np.float32)
    raise ValueError(f"{variant.backend!r} is not a K-means backend")


def _density(variant: Variant, algorithm: str, x: np.ndarray, eps: float) -> np.ndarray:
    """Labels of DBSCAN (`eps`, `DBSCAN_MIN_SAMPLES`) or HDBSCAN on one backend."""
    if variant.backend == "sklearn":
        from sklearn.cluster import DBSCAN, HDBSCAN

        if algorithm == "dbscan":
            return np.asarray(DBSCAN(eps=eps, min_samples=DBSCAN_MIN_SAMPLES).fit(x).labels_)
        return np.asarray(HDBSCAN(min_cluster_size=HDBSCAN_MIN_CLUSTER_SIZE, copy=True).fit(x).labels_)
    if variant.backend == "torch":
        from service.analysis.torch_backend import dbscan_torch

        return dbscan_torch(x, eps, DBSCAN_MIN_SAMPLES, device=variant.device)
    if variant.backend == "cuml":
        if algorithm == "dbscan":
            from cuml.cluster import DBSCAN as CUML_DBSCAN

            db = CUML_DBSCAN(eps=eps, min_samples=DBSCAN_MIN_SAMPLES, max_mbytes_per_batch=2048, output_type="numpy")
            return np.asarray(db.fit_predict(x), np.int64)
        from cuml.cluster.hdbscan import HDBSCAN as CUML_HDBSCAN

        return np.asarray(CUML_HDBSCAN(min_cluster_size=HDBSCAN_MIN_CLUSTER_SIZE, output_type="numpy").fit_predict(x))
    raise ValueError(f"{variant.backend!r} is not a density backend")


def knee_eps(x: np.ndarray, k: int = DBSCAN_MIN_SAMPLES) -> float:
    """DBSCAN's eps at the knee of the sorted k-distance curve (the point farthest below the chord)."""
    if not _missing("sklearn"):
        from sklearn.neighbors import NearestNeighbors

        distances = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)[0][:, -1]
    else:  # the same curve through the torch backend (its k counts the point itself, as kneighbors on x does)
        from service.analysis.torch_backend import k_distances

        distances = k_distances(x, k, device="cuda" if torch.cuda.is_available() else "cpu")
    curve = np.sort(distances)
    line = np.linspace(curve[0], curve[-1], len(curve))
    return float(curve[int(np.argmax(line - curve))])


def _reduce(sample: np.ndarray, seed: int) -> np.ndarray:
    """The density algorithms' input: the first 50 principal components of the sample."""
    dims = min(50, sample.shape[1], len(sample))
    if not _missing("sklearn"):
        from sklearn.decomposition import PCA

        return np.asarray(PCA(n_components=dims, random_state=seed).fit_transform(sample), np.float32)
    from service.analysis.torch_backend import pca_torch

    return pca_torch(sample, dims, device="cuda" if torch.cuda.is_available() else "cpu")


def _ari(a: np.ndarray, b: np.ndarray) -> float | None:
    if _missing("sklearn"):
        return None
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


def _kmeans_baseline(x: np.ndarray, k: int, seed: int) -> float | None:
    if _missing("sklearn"):
        return None
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    KMeans(n_clusters=k, n_init=1, max_iter=KMEANS_ITERATIONS, tol=0.0, random_state=seed, algorithm="lloyd").fit(x)
    return time.perf_counter() - start


def bench_clustering(
    vectors: np.ndarray, limit: int, plan: Sequence[Variant], *, seed: int = 0, baseline: bool = True
) -> list[Stage]:
    """K-means over every vector (against scikit-learn KMeans with the same iterations, `baseline`), and DBSCAN and
    HDBSCAN on a sample of `limit` points reduced to 50 dimensions (GPU variants against scikit-learn's run of the
    same algorithm, with the adjusted Rand index of their labels to its labels)."""
    n = len(vectors)
    stages: list[Stage] = []
    base_seconds: dict[int, float | None] = {}
    for variant in (v for v in plan if v.runs and v.stage.startswith("k-means")):
        k = int(variant.stage.split("k=", 1)[1].split(" ", 1)[0])
        if k not in base_seconds:
            base_seconds[k] = _kmeans_baseline(vectors, k, seed) if baseline else None
        base = base_seconds[k]
        base_name = "scikit-learn KMeans" if base is not None else ""
        stage = Stage(variant.stage, "seconds", 0.0, base, base_name, higher_is_better=False, images=n)
        if variant.device == "cuda":
            _kmeans(variant, vectors[: min(n, max(4 * k, 512))], k, seed)  # compile the kernels: not timed
            _sync()
        with _measure(stage):
            start = time.perf_counter()
            labels, centres = _kmeans(variant, vectors, k, seed)
            stage.value = time.perf_counter() - start
        stage.details = {"iterations": KMEANS_ITERATIONS, "inertia": _inertia(vectors, labels, centres)}
        stages.append(stage)
    density = [v for v in plan if v.runs and not v.stage.startswith("k-means")]
    if not density:
        return stages
    sample = vectors[np.random.default_rng(seed).permutation(n)[: min(n, limit)]]
    reduced = _reduce(sample, seed)
    eps = knee_eps(reduced)
    reference: dict[str, tuple[float, np.ndarray]] = {}
    for variant in density:
        algorithm = "dbscan" if variant.stage.startswith("DBSCAN") else "hdbscan"
        ref = reference.get(algorithm)
        stage = Stage(
            variant.stage,
            "seconds",
            0.0,
            ref[0] if ref else None,
            f"{variant.stage.split(' / ')[0]} / scikit-learn" if ref else "",
            higher_is_better=False,
            images=len(sample),
        )
        if variant.device == "cuda":
            _density(variant, algorithm, reduced[: min(len(reduced), 512)], eps)  # not timed
            _sync()
        with _measure(stage):
            start = time.perf_counter()
            labels = _density(variant, algorithm, reduced, eps)
            stage.value = time.perf_counter() - start
        stage.details = {
            "points": len(sample),
            "pca_dims": reduced.shape[1],
            "clusters": int(labels.max() + 1) if labels.size else 0,
            "noise_fraction": float((labels < 0).mean()),
        }
        if algorithm == "dbscan":
            stage.details["eps"] = eps
        if ref is None and variant.backend == "sklearn":
            reference[algorithm] = (stage.value, labels)
        elif ref is not None:
            stage.details["ari_vs_scikit_learn"] = _ari(labels, ref[1])
        stages.append(stage)
    return stages
