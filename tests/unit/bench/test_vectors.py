"""The kNN and clustering bench stages: which backends are planned where, and that each one measures the right thing.

The GPU variants are planned only with CUDA and listed as skipped, with the reason, without it. Their code paths
(the torch top-k, torch K-means and DBSCAN) run here on CPU tensors and are checked against independent
references: numpy brute force for the neighbours, scikit-learn's DBSCAN for the labels, faiss for the inertia. On a
GPU they run on CUDA in `bench.gpu_check` (section `bench_vectors`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import vectors as bv
from bench.run import to_markdown

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _blobs(n: int, d: int = 8, centres: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=20.0, size=(centres, d))
    return (means[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_the_cpu_plans_run_the_cpu_backends_and_say_why_the_gpu_ones_do_not() -> None:
    knn = bv.knn_plan(CPU, 5000)
    assert [v.backend for v in knn if v.runs] == ["faiss-cpu", "hnsw", "ivf"]
    assert {v.backend: v.skip for v in knn if not v.runs} == {"torch": bv.NO_CUDA, "faiss-gpu": bv.NO_CUDA}
    assert knn[2].stage == f"kNN graph k=10 / faiss ivf-flat nlist={bv.nlist_for(5000)} nprobe=16"
    clustering = bv.cluster_plan(CPU, 5000)
    assert [v.stage for v in clustering if v.runs] == [
        "k-means k=4 / faiss",
        "k-means k=100 / faiss",
        "k-means k=1000 / faiss",
        "DBSCAN eps=auto / scikit-learn",
        "HDBSCAN min_cluster_size=25 / scikit-learn",
    ]
    gpu = [v for v in clustering if v.device == "cuda"]
    assert len(gpu) == 3 * 2 + 2 + 1 and all(v.skip == bv.NO_CUDA for v in gpu)
    assert bv.skipped(knn) == [
        {"stage": "kNN graph k=10 / torch top-k cuda (exact)", "reason": bv.NO_CUDA},
        {"stage": "kNN graph k=10 / faiss-gpu flat (exact)", "reason": bv.NO_CUDA},
    ]


def test_with_cuda_the_torch_backends_are_planned_and_missing_packages_named() -> None:
    # Only planning: nothing here touches CUDA. faiss-cpu and no cuML are what this machine has.
    knn = {v.backend: v.skip for v in bv.knn_plan(CUDA, 5000)}
    assert knn["torch"] == ""
    assert "no GPU support" in knn["faiss-gpu"]
    clustering = {v.stage: v.skip for v in bv.cluster_plan(CUDA, 500)}
    assert clustering["k-means k=100 / torch cuda"] == "" and "k-means k=1000 / torch cuda" not in clustering
    assert clustering["DBSCAN eps=auto / torch cuda"] == ""
    assert "cuML" in clustering["k-means k=4 / cuml"] and "cuML" in clustering["HDBSCAN min_cluster_size=25 / cuml"]


def test_the_knn_stage_finds_the_true_neighbours_on_every_exact_backend() -> None:
    x = _unit(400, 24)
    plan = [
        bv.Variant("kNN graph k=10 / faiss flat (exact)", "faiss-cpu", "cpu"),
        bv.Variant("kNN graph k=10 / faiss hnsw M=32 efSearch=64", "hnsw", "cpu"),
        bv.Variant("kNN graph k=10 / torch top-k cpu (exact)", "torch", "cpu"),  # the GPU variant's code, on CPU
        bv.Variant("kNN graph k=10 / faiss-gpu flat (exact)", "faiss-gpu", "cuda", "needs a GPU"),
    ]
    stages = {s.name: s for s in bv.bench_knn(x, plan)}
    assert list(stages) == [v.stage for v in plan[:3]]  # the skipped one is not a stage
    # Independent truth: numpy brute force over all pairs.
    truth = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :11]
    for name in ("kNN graph k=10 / faiss flat (exact)", "kNN graph k=10 / torch top-k cpu (exact)"):
        stage = stages[name]
        assert stage.value > 0 and stage.baseline is not None and stage.baseline_name == "scikit-learn brute force"
        assert stage.details["recall_at_10"] == 1.0
    torch_found = bv._exact_searcher(plan[2])(x, x, 11)
    np.testing.assert_array_equal(torch_found[:, 1:], truth[:, 1:])
    hnsw = stages["kNN graph k=10 / faiss hnsw M=32 efSearch=64"]
    assert hnsw.baseline_name == "faiss flat (exact)" and hnsw.baseline == stages[plan[0].stage].value
    assert 0.5 < hnsw.details["recall_at_10"] <= 1.0


def test_without_a_baseline_the_knn_stage_still_runs() -> None:
    x = _unit(120, 8)
    (stage,) = bv.bench_knn(x, [bv.Variant("kNN graph k=10 / torch top-k cpu (exact)", "torch", "cpu")], baseline=False)
    assert stage.baseline is None and stage.ratio is None and stage.details["recall_at_10"] == 1.0


def test_the_clustering_stage_runs_the_torch_backends_and_compares_them() -> None:
    x = _blobs(600)
    plan = [
        bv.Variant("k-means k=4 / faiss", "faiss", "cpu"),
        bv.Variant("k-means k=4 / torch cpu", "torch", "cpu"),
        bv.Variant("k-means k=4 / cuml", "cuml", "cuda", "cuML is not installed"),
        bv.Variant("DBSCAN eps=auto / scikit-learn", "sklearn", "cpu"),
        bv.Variant("DBSCAN eps=auto / torch cpu", "torch", "cpu"),
        bv.Variant("HDBSCAN min_cluster_size=25 / scikit-learn", "sklearn", "cpu"),
    ]
    stages = {s.name: s for s in bv.bench_clustering(x, 600, plan)}
    assert list(stages) == [v.stage for v in plan if v.runs]
    faiss_km, torch_km = stages["k-means k=4 / faiss"], stages["k-means k=4 / torch cpu"]
    assert faiss_km.baseline == torch_km.baseline is not None  # one scikit-learn run per k, shared
    # Four well-separated blobs: both find them, so their inertias agree.
    assert torch_km.details["inertia"] == pytest.approx(faiss_km.details["inertia"], rel=1e-3)
    db_sk, db_torch = stages["DBSCAN eps=auto / scikit-learn"], stages["DBSCAN eps=auto / torch cpu"]
    assert db_torch.baseline == db_sk.value and db_torch.baseline_name == "DBSCAN eps=auto / scikit-learn"
    assert db_torch.details["eps"] == db_sk.details["eps"] > 0
    assert db_torch.details["ari_vs_scikit_learn"] == pytest.approx(1.0)  # exact DBSCAN, same eps: same clusters
    assert db_sk.details["clusters"] == db_torch.details["clusters"] >= 1


def test_the_summary_lists_what_did_not_run_and_why() -> None:
    result = {
        "device": "CPU",
        "date": "today",
        "command": "embedserve bench run --quick",
        "data": {"images": 1, "synthetic": True},
        "versions": {"torch": torch.__version__},
        "stages": [],
        "skipped": bv.skipped(bv.knn_plan(CPU, 100)),
    }
    text = to_markdown(result)
    assert f"Not run here: kNN graph k=10 / torch top-k cuda (exact) ({bv.NO_CUDA})" in text
