"""Approximate indexes (IVF-Flat, IVF-PQ, HNSW): recall@10 against exact search on a clustered set of 20k vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.config import load_config
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
