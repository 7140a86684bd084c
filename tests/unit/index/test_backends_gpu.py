"""faiss-gpu exact search, on the CPU: `FaissGpuExact` with an injected knn that behaves like `faiss.knn_gpu`
(including its abort above k = 2048), checked against a numpy brute force."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from service.config import load_config
from service.errors import ConfigError
from service.index.backends import GPU_MAX_SELECTION_K, FaissGpuExact, SearchMetric, make_exact_searcher
from tests.unit.index.test_backends import numpy_top_k


class FakeKnnGpu:
    """`faiss.knn_gpu` semantics in torch; k > GPU_MAX_SELECTION_K is the process abort of FAISS_ASSERT."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[int, int]] = []  # (k, id of the database tensor)
        self.delay_s = delay_s
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, res: Any, q: Any, base: Any, k: int, *, metric: SearchMetric, device: int) -> Any:
        if k > GPU_MAX_SELECTION_K:
            pytest.fail(f"knn_gpu called with k={k}: faiss would abort() the server")
        assert isinstance(base, torch.Tensor) and isinstance(q, torch.Tensor), "numpy inputs copy the database"
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.calls.append((k, id(base)))
        time.sleep(self.delay_s)
        if metric == "ip":
            scores, idx = torch.topk(q.double() @ base.double().T, k, dim=1)
        else:
            scores, idx = torch.topk(torch.cdist(q.double(), base.double()) ** 2, k, dim=1, largest=False)
        with self._lock:
            self.active -= 1
        return scores.float(), idx


def _searcher(knn: FakeKnnGpu) -> FaissGpuExact:
    return FaissGpuExact("cpu", knn=knn, resources=object)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_k_over_the_faiss_gpu_limit_goes_to_torch(metric: SearchMetric) -> None:
    rng = np.random.default_rng(3)
    database = rng.normal(size=(3000, 8)).astype(np.float32)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    knn = FakeKnnGpu()
    searcher = _searcher(knn)
    for k in (10, GPU_MAX_SELECTION_K, GPU_MAX_SELECTION_K + 1, 2500):
        scores, found = searcher.search(database, queries, k, metric=metric, cache_key="c", version=1)
        want_scores, want_found = numpy_top_k(database, queries, k, metric, None)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)
        # Far-down ranks may swap near-ties between float32 and float64: compare the sets of the first 100.
        assert all(set(a[:100]) == set(b[:100]) for a, b in zip(found, want_found, strict=True))
    assert [k for k, _ in knn.calls] == [10, GPU_MAX_SELECTION_K]


def test_rows_subset_and_padding_match_numpy() -> None:
    rng = np.random.default_rng(5)
    database = rng.normal(size=(200, 6)).astype(np.float32)
    queries = rng.normal(size=(3, 6)).astype(np.float32)
    searcher = _searcher(FakeKnnGpu())
    for rows in (np.sort(rng.choice(200, size=30, replace=False)), np.array([4, 9]), np.zeros(0, np.int64)):
        scores, found = searcher.search(database, queries, 5, metric="ip", rows=rows, cache_key="c")
        want_scores, want_found = numpy_top_k(database, queries, 5, "ip", rows)
        assert found.tolist() == want_found.tolist()
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_device_copy_is_kept_per_collection_version() -> None:
    rng = np.random.default_rng(1)
    v1 = rng.normal(size=(100, 4)).astype(np.float32)
    v2 = np.concatenate([v1, rng.normal(size=(10, 4)).astype(np.float32)])
    q = v1[:2]
    knn = FakeKnnGpu()
    searcher = _searcher(knn)
    for _ in range(3):
        searcher.search(v1, q, 3, metric="ip", cache_key="a", version=1)
    searcher.search(v2, q, 3, metric="ip", cache_key="a", version=2)
    ids = [tensor_id for _, tensor_id in knn.calls]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # one copy while the version holds, a new one after
    searcher.evict("a")
    assert not searcher._mirror._copies


def test_searches_from_many_threads_never_share_the_gpu_resources() -> None:
    rng = np.random.default_rng(2)
    database = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(16, 8)).astype(np.float32)
    knn = FakeKnnGpu(delay_s=0.005)
    searcher = _searcher(knn)

    def one(i: int) -> list[int]:
        _, found = searcher.search(database, queries[i : i + 1], 4, metric="l2", cache_key="c", version=1)
        return found[0].tolist()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(16)))
    _, want = numpy_top_k(database, queries, 4, "l2", None)
    assert got == want.tolist()
    assert knn.most_active == 1 and len(knn.calls) == 16


def test_index_device_names_a_gpu_that_must_exist() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    cfg = load_config(env={}, overrides={"index.device": "cuda:1"})
    with pytest.raises(ConfigError, match=r"index.device=cuda:1"):
        make_exact_searcher(cfg.index)
    with pytest.raises(ConfigError, match="not a device"):
        load_config(env={}, overrides={"index.device": "gpu0"})
