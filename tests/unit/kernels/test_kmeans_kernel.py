"""The K-means assignment and update kernels against their plain-torch references.

Tolerances: squared distances within 1e-4 relative (+1e-4 absolute) of the reference; a label may
differ from the reference only where the reference's distance to the kernel's centroid is within that
tolerance of its minimum (a near tie broken by rounding). Exact ties (integer data) must go to the
lowest centroid index. Centroids within 1e-5 absolute (+1e-5 relative) of the reference, counts exact.
"""

from __future__ import annotations

import pytest
import torch

from kernels import kmeans as K
from kernels._triton import is_interpreted

RTOL = 1e-4
ATOL = 1e-4
SMALL = {"block_n": 16, "block_k": 16, "block_d": 16}  # several tiles over points, centroids and features


def _full_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x64, c64 = x.double().cpu(), c.double().cpu()
    return torch.cdist(x64, c64) ** 2


def _assert_assignment(x: torch.Tensor, c: torch.Tensor, labels: torch.Tensor, dists: torch.Tensor) -> None:
    ref_labels, ref_dists = K.kmeans_assign_reference(x, c)
    labels, dists = labels.cpu(), dists.cpu()
    assert labels.dtype == torch.int64
    assert dists.dtype == torch.float32
    tol = ATOL + RTOL * ref_dists.cpu().abs()
    assert bool(((dists - ref_dists.cpu()).abs() <= tol).all())
    full = _full_distances(x, c)
    chosen = full.gather(1, labels[:, None])[:, 0]
    assert bool((chosen <= full.min(dim=1).values + tol.double()).all()), "a label is not (near) optimal"
    mismatch = labels != ref_labels.cpu()
    assert mismatch.float().mean() <= 0.05


def test_kernel_mode(device: str) -> None:
    assert is_interpreted(K._kmeans_assign_kernel) == (device == "cpu")
    assert is_interpreted(K._segment_sum_kernel) == (device == "cpu")


@pytest.mark.parametrize(("n", "k", "d"), [(61, 1, 5), (61, 7, 20), (45, 40, 33), (1, 3, 1)])
def test_assign_matches_reference(device: str, n: int, k: int, d: int) -> None:
    g = torch.Generator().manual_seed(n + k + d)
    x = torch.randn(n, d, generator=g).to(device)
    c = torch.randn(k, d, generator=g).to(device)
    _assert_assignment(x, c, *K._kmeans_assign_triton(x, c, **SMALL))


@pytest.mark.parametrize(
    ("x_dtype", "c_dtype"),
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_assign_half_inputs(device: str, x_dtype: torch.dtype, c_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 24, generator=g).to(x_dtype).to(device)
    c = torch.randn(20, 24, generator=g).to(c_dtype).to(device)
    _assert_assignment(x, c, *K._kmeans_assign_triton(x, c, **SMALL))


def test_assign_strided_inputs(device: str) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(18, 33, generator=g).T.to(device)  # (33, 18), column-major
    c = torch.randn(18, 30, generator=g)[:, ::2].T.to(device)  # (15, 18), every other column
    _assert_assignment(x, c, *K._kmeans_assign_triton(x, c, **SMALL))
    labels = torch.arange(33, device=device) % 5
    got = K._kmeans_update_triton(x, labels, 5, block_n=16, block_d=16)
    ref = K.kmeans_update_reference(x, labels, 5)
    assert torch.allclose(got[0].cpu(), ref[0].cpu(), atol=1e-5, rtol=1e-5)


def test_assign_ties_go_to_lowest_index(device: str) -> None:
    # Integer data keeps every distance exact, so these are true ties.
    c = torch.zeros(40, 4)
    c[:, 0] = torch.arange(40) + 10.0  # far away from the points below
    c[3] = torch.tensor([1.0, 0, 0, 0])
    c[5] = torch.tensor([-1.0, 0, 0, 0])  # same distance from the origin as c[3]
    c[7] = torch.tensor([0.0, 2, 0, 0])
    c[23] = torch.tensor([0.0, 2, 0, 0])  # duplicate of c[7], in another 16-wide tile
    c[30] = torch.tensor([0.0, 2, 0, 0])
    x = torch.tensor([[0.0, 0, 0, 0], [0.0, 2, 0, 0], [0.0, 3, 0, 0], [1.0, 0, 0, 0]])
    labels, dists = K._kmeans_assign_triton(x.to(device), c.to(device), **SMALL)
    assert labels.tolist() == [3, 7, 7, 3]
    assert dists.tolist() == [1.0, 0.0, 1.0, 0.0]
    ref_labels, _ = K.kmeans_assign_reference(x, c)
    assert ref_labels.tolist() == [3, 7, 7, 3]


def test_assign_empty_and_errors(device: str) -> None:
    labels, dists = K._kmeans_assign_triton(torch.empty(0, 3, device=device), torch.ones(2, 3, device=device))
    assert labels.shape == dists.shape == (0,)
    with pytest.raises(ValueError, match="at least one centroid"):
        K.kmeans_assign(torch.ones(2, 3, device=device), torch.empty(0, 3, device=device))
    with pytest.raises(ValueError, match="features"):
        K.kmeans_assign(torch.ones(2, 3, device=device), torch.ones(2, 4, device=device))


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_update_matches_reference(device: str, split: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(70, 21, generator=g).to(dtype).to(device)
    labels = torch.randint(0, 9, (70,), generator=g)
    labels[labels == 4] = 5  # cluster 4 is empty
    labels = labels.to(device)
    centroids, counts = K._kmeans_update_triton(x, labels, 10, split=split, block_n=16, block_d=16)
    ref_centroids, ref_counts = K.kmeans_update_reference(x, labels, 10)
    assert centroids.dtype == torch.float32
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    assert counts[4] == 0
    assert counts[9] == 0  # k larger than any label
    assert torch.allclose(centroids.cpu(), ref_centroids.cpu(), atol=1e-5, rtol=1e-5)
    assert torch.equal(centroids[4].cpu(), torch.zeros(21))


def test_update_keeps_previous_for_empty_clusters(device: str) -> None:
    x = torch.arange(12.0).reshape(4, 3).to(device)
    labels = torch.tensor([0, 0, 2, 2], dtype=torch.int32, device=device)
    previous = torch.full((3, 3), 7.0, device=device)
    for run in (K._kmeans_update_triton, K.kmeans_update_reference):
        centroids, counts = run(x, labels, 3, previous=previous)
        assert counts.tolist() == [2, 0, 2]
        assert centroids.tolist() == [[1.5, 2.5, 3.5], [7.0, 7.0, 7.0], [7.5, 8.5, 9.5]]


def test_update_rejects_bad_labels(device: str) -> None:
    x = torch.ones(3, 2, device=device)
    with pytest.raises(ValueError, match="< k"):
        K.kmeans_update(x, torch.tensor([0, 1, 3], device=device), 3)
    with pytest.raises(ValueError, match=">= 0"):
        K.kmeans_update(x, torch.tensor([0, -1, 1], device=device), 3)
    with pytest.raises(ValueError, match="shape"):
        K.kmeans_update(x, torch.tensor([0, 1], device=device), 3)


def test_public_functions_dispatch(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 6, generator=g).to(device)
    c = torch.randn(4, 6, generator=g).to(device)
    _assert_assignment(x, c, *K.kmeans_assign(x, c, backend="triton"))
    labels, _ = K.kmeans_assign(x, c, backend="torch")
    ref = K.kmeans_update_reference(x, labels, 4)
    got = K.kmeans_update(x, labels, 4, backend="triton")
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    if device == "cpu":

        def fail(*args: object, **kwargs: object) -> None:
            raise AssertionError("the kernel ran for CPU tensors")

        monkeypatch.setattr(K, "_kmeans_assign_triton", fail)
        monkeypatch.setattr(K, "_kmeans_update_triton", fail)
        _assert_assignment(x, c, *K.kmeans_assign(x, c))
        assert torch.equal(K.kmeans_update(x, labels, 4)[1], ref[1])


def test_compiles_for_gpu(gpu_compile_report: dict[str, str]) -> None:
    names = ("_kmeans_assign_kernel", "_segment_sum_kernel")
    results = {name: status for name, status in gpu_compile_report.items() if name.startswith(names)}
    assert len(results) >= 2
    assert all(status == "ok" for status in results.values()), results
