"""Search backends: exact searchers against numpy, and the approximate indexes (IVF-Flat, IVF-PQ, HNSW) through the
store: recall@10 against exact search on a clustered set of 20k vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.config import load_config
from service.index.backends import ExactSearcher, FaissExact, SearchMetric, TorchExact, auto_nlist
from service.index.store import IndexStore

N, DIM, CLUSTERS, K = 20_000, 32, 64, 10


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, list[str], list[dict[str, str]], np.ndarray]:
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32) * 3
    assignment = rng.integers(0, CLUSTERS, size=N)
    vectors = (centers[assignment] + rng.normal(size=(N, DIM))).astype(np.float32)
    keys = [f"v{i:05d}" for i in range(N)]
    attributes = [{"label": "abcd"[c % 4]} for c in assignment]
    queries = (centers[rng.integers(0, CLUSTERS, size=200)] + rng.normal(size=(200, DIM))).astype(np.float32)
    return vectors, keys, attributes, queries


def recall(approx: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)]))


@pytest.mark.parametrize("index_type", ["ivf_flat", "ivf_pq", "hnsw"])
def test_recall_at_10_against_exact(tmp_path: Path, index_type: str, clustered) -> None:  # type: ignore[no-untyped-def]
    vectors, keys, attributes, queries = clustered
    overrides = {
        "data_dir": str(tmp_path),
        "index.type": index_type,
        "index.train_min_vectors": 10_000,
        "index.pq_m": 8,
        "index.hnsw_m": 16,
        "index.ef_construction": 80,
    }
    cfg = load_config(env={}, overrides=overrides)
    with IndexStore.open(cfg) as store:
        store.create_collection("approx", dim=DIM)
        store.create_collection("exact", dim=DIM, index_type="flat")
        for start in range(0, N, 2000):
            sl = slice(start, start + 2000)
            for name in ("approx", "exact"):
                store.upsert(name, keys[sl], vectors[sl], attributes[sl])
            if start == 0:
                assert not store.info("approx").trained  # too few vectors yet: exact search
        store.wait_idle()
        info = store.info("approx")
        assert info.trained and info.search_backend == index_type and info.count == N
        results = {}
        for flt in ("", "label == a"):
            got = [[h.key for h in q] for q in store.search("approx", queries, K, filter=flt)]
            want = [[h.key for h in q] for q in store.search("exact", queries, K, filter=flt)]
            results[flt] = recall(got, want)
            if flt:
                assert all(store.fetch("approx", q).attributes[0]["label"] == "a" for q in got if q)
        print(f"{index_type}: recall@10 {results['']:.3f}, with a 25% filter {results['label == a']:.3f}")
        assert results[""] >= 0.95 and results["label == a"] >= 0.95, results
        # Deleted and replaced items never come back from the approximate index.
        gone = [h.key for h in store.search("approx", queries[:20], K)[0]]
        store.delete("approx", gone)
        assert not set(gone) & {h.key for q in store.search("approx", queries[:20], K) for h in q}
    with IndexStore.open(cfg) as store:  # the built index is in the snapshot: no rebuild needed
        assert store.info("approx").trained
        assert store.count("approx") == N - len(gone)


def numpy_top_k(
    database: np.ndarray, queries: np.ndarray, k: int, metric: str, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: the k best positions among `rows` (all when None), -1 and the worst score beyond."""
    positions = np.arange(len(database)) if rows is None else rows
    base, q = database[positions].astype(np.float64), queries.astype(np.float64)
    scores = q @ base.T if metric == "ip" else ((q[:, None, :] - base[None]) ** 2).sum(-1)
    order = np.argsort(-scores if metric == "ip" else scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    found = positions[order]
    pad = k - found.shape[1]
    fill = -np.inf if metric == "ip" else np.inf
    return np.pad(top, ((0, 0), (0, pad)), constant_values=fill), np.pad(found, ((0, 0), (0, pad)), constant_values=-1)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("searcher", [FaissExact(), TorchExact("cpu")], ids=["faiss", "torch"])
def test_exact_searchers_against_numpy(searcher: ExactSearcher, metric: SearchMetric) -> None:
    rng = np.random.default_rng(11)
    database = rng.normal(size=(500, 12)).astype(np.float32)
    queries = rng.normal(size=(7, 12)).astype(np.float32)
    for k, rows in ((10, None), (10, np.sort(rng.choice(500, size=40, replace=False))), (9, np.array([3, 77, 401]))):
        scores, found = searcher.search(database, queries, k, metric=metric, rows=rows)
        want_scores, want_found = numpy_top_k(database, queries, k, metric, rows)
        assert scores.shape == found.shape == (7, k) and found.dtype == np.int64
        assert found.tolist() == want_found.tolist()
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    scores, found = searcher.search(database, queries, 3, metric=metric, rows=np.zeros(0, np.int64))
    assert (found == -1).all() and scores.shape == (7, 3)


def test_auto_nlist() -> None:
    for n in (1, 39, 100, 10_000, 1_000_000):
        nlist = auto_nlist(n)
        assert nlist >= 1 and (nlist == 1 or n / nlist >= 39) and nlist <= max(1, int(4 * n**0.5))
