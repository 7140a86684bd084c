"""The blockwise top-k search kernel against the plain-torch reference (full matmul + torch.topk).

Tolerances: scores within 1e-5 relative (+1e-5 absolute) of the reference, in the same order; every
returned index must score (in a float64 recomputation) what was returned for it, within the same
tolerance, so near-ties may come back in either order. Exact ties (integer data) come back lowest
index first. Places beyond the database size hold -inf (ip) / +inf (l2) and index -1.
"""

from __future__ import annotations

import pytest
import torch

from kernels import topk as T
from kernels._triton import is_interpreted

RTOL = 1e-5
ATOL = 1e-5
SMALL = {"block_q": 16, "block_n": 16, "block_d": 16}  # several tiles over queries, rows and features


def _true_scores(q: torch.Tensor, db: torch.Tensor, metric: str) -> torch.Tensor:
    q64, db64 = q.double().cpu(), db.double().cpu()
    return q64 @ db64.T if metric == "ip" else torch.cdist(q64, db64) ** 2


def _assert_search(
    q: torch.Tensor, db: torch.Tensor, k: int, metric: str, scores: torch.Tensor, idx: torch.Tensor
) -> None:
    ref_scores, _ = T.search_topk_reference(q, db, k, metric)  # type: ignore[arg-type]
    scores, idx, ref_scores = scores.cpu(), idx.cpu(), ref_scores.cpu()
    assert scores.shape == idx.shape == (q.shape[0], k)
    assert scores.dtype == torch.float32
    assert idx.dtype == torch.int64
    tol = ATOL + RTOL * ref_scores.abs().nan_to_num(posinf=0.0, neginf=0.0)
    finite = torch.isfinite(ref_scores)
    assert torch.equal(finite, torch.isfinite(scores))
    assert torch.equal(scores[~finite], ref_scores[~finite])
    assert bool(((scores - ref_scores).abs()[finite] <= tol[finite]).all())
    assert bool((idx[~finite] == -1).all())
    true = _true_scores(q, db, metric)
    rows = torch.arange(q.shape[0])[:, None].expand_as(idx)
    got = true[rows[finite], idx[finite]]
    assert bool(((got - scores[finite].double()).abs() <= tol[finite].double() * 2).all())
    for row in idx.tolist():  # no index twice in one row
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real))


def test_kernel_mode(device: str) -> None:
    assert is_interpreted(T._topk_kernel) == (device == "cpu")


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize(("k", "splits"), [(1, 1), (5, 3), (16, 1), (45, 2), (60, 1)])
def test_matches_reference(device: str, metric: str, k: int, splits: int) -> None:
    g = torch.Generator().manual_seed(k)
    q = torch.randn(19, 24, generator=g).to(device)
    db = torch.randn(45, 24, generator=g).to(device)  # k=45 is all rows, k=60 is more than there are
    _assert_search(q, db, k, metric, *T._search_topk_triton(q, db, k, metric, splits=splits, **SMALL))  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(9, 20, generator=g).to(dtype).to(device)
    db = torch.randn(40, 20, generator=g).to(dtype).to(device)
    for metric in ("ip", "l2"):
        _assert_search(q, db, 6, metric, *T._search_topk_triton(q, db, 6, metric, **SMALL))  # type: ignore[arg-type]


def test_strided_inputs(device: str) -> None:
    g = torch.Generator().manual_seed(9)
    q = torch.randn(20, 6, generator=g).T.to(device)  # (6, 20), column-major
    db = torch.randn(20, 50, generator=g).T.to(device)  # (50, 20)
    for metric in ("ip", "l2"):
        _assert_search(q, db, 7, metric, *T._search_topk_triton(q, db, 7, metric, **SMALL))  # type: ignore[arg-type]


def test_ties_lowest_index_first(device: str) -> None:
    db = torch.zeros(40, 3)
    db[:, 2] = -5.0  # poor matches everywhere else
    for i in (2, 9, 17, 33):  # exact duplicates across tiles and slices
        db[i] = torch.tensor([1.0, 1.0, 0.0])
    db[5] = torch.tensor([1.0, 0.0, 0.0])
    db[6] = torch.tensor([0.0, 1.0, 0.0])  # ties with db[5] for the query below
    q = torch.tensor([[1.0, 1.0, 0.0]])
    for splits in (1, 2):
        scores, idx = T._search_topk_triton(q.to(device), db.to(device), 6, "ip", splits=splits, **SMALL)
        assert idx.tolist() == [[2, 9, 17, 33, 5, 6]]
        assert scores.tolist() == [[2.0, 2.0, 2.0, 2.0, 1.0, 1.0]]
        scores, idx = T._search_topk_triton(q.to(device), db.to(device), 6, "l2", splits=splits, **SMALL)
        assert idx.tolist() == [[2, 9, 17, 33, 5, 6]]
        assert scores.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]


def test_zero_scores_of_both_signs_tie(device: str) -> None:
    # q . db[0] is +0.0 and q . db[1] is -0.0: equal scores, so the lower index comes first.
    q = torch.tensor([[1.0, 0.0]], device=device)
    db = torch.tensor([[0.0, 1.0], [-0.0, -1.0], [-1.0, 0.0]], device=device)
    scores, idx = T._search_topk_triton(q, db, 3, "ip", **SMALL)
    assert idx.tolist() == [[0, 1, 2]]
    assert scores.tolist() == [[0.0, 0.0, -1.0]]


def test_k_larger_than_database_and_empty_inputs(device: str) -> None:
    q = torch.randn(3, 4, device=device)
    db = torch.randn(2, 4, device=device)
    for metric, fill in (("ip", float("-inf")), ("l2", float("inf"))):
        for run in (T._search_topk_triton, T.search_topk_reference):
            scores, idx = run(q, db, 5, metric)  # type: ignore[operator]
            assert idx[:, 2:].tolist() == [[-1, -1, -1]] * 3
            assert bool((scores[:, 2:] == fill).all())
            assert sorted(idx[0, :2].tolist()) == [0, 1]
        scores, idx = T._search_topk_triton(q, db[:0], 2, metric)  # type: ignore[arg-type]
        assert bool((idx == -1).all())
        assert bool((scores == fill).all())
    scores, idx = T._search_topk_triton(q[:0], db, 2, "ip")
    assert scores.shape == idx.shape == (0, 2)


def test_public_function_dispatch(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(8)
    q = torch.randn(5, 8, generator=g).to(device)
    db = torch.randn(30, 8, generator=g).to(device)
    _assert_search(q, db, 4, "l2", *T.search_topk(q, db, 4, "l2", backend="triton"))
    _assert_search(q, db, 4, "ip", *T.search_topk(q, db, 4, "ip", backend="torch"))
    with pytest.raises(ValueError, match="k <="):
        T._search_topk_triton(q, db, T.MAX_KERNEL_K + 1)
    if device == "cpu":

        def fail(*args: object, **kwargs: object) -> None:
            raise AssertionError("the kernel ran for CPU tensors")

        monkeypatch.setattr(T, "_search_topk_triton", fail)
        _assert_search(q, db, 4, "ip", *T.search_topk(q, db, 4))
    with pytest.raises(ValueError, match="metric"):
        T.search_topk(q, db, 4, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        T.search_topk(q, db, 0)


def test_compiles_for_gpu(gpu_compile_report: dict[str, str]) -> None:
    results = {name: status for name, status in gpu_compile_report.items() if name.startswith("_topk_kernel")}
    assert results
    assert all(status == "ok" for status in results.values()), results
