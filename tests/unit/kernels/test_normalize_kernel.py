"""The fused L2-normalise + cast kernel against the plain-torch reference.

Tolerances: rows have unit norm, so every output is in [-1, 1]. float32 output within 1e-6 absolute
of the float32 reference; float16/bfloat16 output within 1e-6 plus one ulp (relative 2**-10 / 2**-7;
the interpreter truncates to bfloat16 where a GPU rounds to nearest).
"""

from __future__ import annotations

import pytest
import torch

from kernels import normalize as N
from kernels._triton import is_interpreted

ATOL = 1e-6
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_close(out: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert out.shape == ref32.shape
    diff = (out.float().cpu() - ref32.cpu()).abs()
    bound = ATOL + ref32.cpu().abs() * ULP.get(dtype, 0.0)
    assert bool((diff <= bound).all()), f"max abs error {diff.max().item():.3g}"


def test_kernel_mode(device: str) -> None:
    assert is_interpreted(N._l2_normalize_kernel) == (device == "cpu")


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(("shape", "block_d"), [((7, 1280), None), ((5, 37), 16), ((1, 1), None)])
def test_matches_reference(
    device: str, in_dtype: torch.dtype, out_dtype: torch.dtype, shape: tuple[int, int], block_d: int | None
) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(in_dtype).to(device)
    out = N._l2_normalize_triton(x, out_dtype, block_d=block_d)
    _assert_close(out, N.l2_normalize_reference(x, torch.float32), out_dtype)


def test_zero_rows_and_strided_input(device: str) -> None:
    base = torch.randn(40, 9, generator=torch.Generator().manual_seed(2))
    base[:, 3] = 0.0
    x = base.T.to(device)  # (9, 40), non-contiguous, row 3 all zeros
    out = N._l2_normalize_triton(x)
    assert torch.equal(out[3].cpu(), torch.zeros(40))
    _assert_close(out, N.l2_normalize_reference(x), torch.float32)
    norms = out.float().norm(dim=1).cpu()
    assert torch.allclose(norms[torch.arange(9) != 3], torch.ones(8), atol=1e-6)


def test_empty(device: str) -> None:
    assert N._l2_normalize_triton(torch.empty(0, 8, device=device)).shape == (0, 8)
    assert N._l2_normalize_triton(torch.empty(3, 0, device=device), torch.float16).shape == (3, 0)


def test_public_function_dispatch(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 10, device=device)
    ref = N.l2_normalize_reference(x)
    _assert_close(N.l2_normalize(x, backend="triton"), ref, torch.float32)
    _assert_close(N.l2_normalize(x, torch.float16, backend="torch"), ref, torch.float16)
    # float64 has no kernel: "auto" takes the reference, "triton" refuses.
    assert N.l2_normalize(x.double(), torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        N.l2_normalize(x.double(), backend="triton")
    if device == "cpu":

        def fail(*args: object, **kwargs: object) -> None:
            raise AssertionError("the kernel ran for CPU tensors")

        monkeypatch.setattr(N, "_l2_normalize_triton", fail)
        _assert_close(N.l2_normalize(x), ref, torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        N.l2_normalize(torch.ones(3, device=device))


def test_compiles_for_gpu(gpu_compile_report: dict[str, str]) -> None:
    results = {name: status for name, status in gpu_compile_report.items() if name.startswith("_l2_normalize")}
    assert results
    assert all(status == "ok" for status in results.values()), results
