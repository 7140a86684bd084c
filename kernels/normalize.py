"""Row-wise L2 normalisation fused with the cast to the output dtype.

`l2_normalize` is the public entry point; `l2_normalize_reference` is the plain-torch definition.
A row of zeros stays zeros (eps guards the division). The Triton kernel reads each row once (twice
for rows wider than `_SINGLE_PASS_MAX` columns), accumulates the squared norm in float32 and writes
the scaled row directly in the output dtype, so no float32 copy of the batch is materialised.
"""

# Triton kernels name compile-time constants in capitals and take many positional arguments.
# ruff: noqa: N803, PLR0917

from __future__ import annotations

import logging

import torch

from kernels._triton import TRITON_AVAILABLE, Backend, next_power_of_2, use_triton

logger = logging.getLogger(__name__)

EPS = 1e-12

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input and output dtypes the Triton kernel handles; others go through the reference."""

_SINGLE_PASS_MAX = 8192  # widest row kept in registers in one block


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"l2_normalize expects a 2-D tensor, got shape {tuple(x.shape)}")


def l2_normalize_reference(x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalise each row of a 2-D tensor to unit L2 norm (computed in float32), then cast."""
    _check(x)
    x32 = x.float()
    norms = x32.norm(dim=1, keepdim=True).clamp_min(EPS)
    return (x32 / norms).to(out_dtype)


def _l2_normalize_triton(
    x: torch.Tensor, out_dtype: torch.dtype = torch.float32, *, block_d: int | None = None
) -> torch.Tensor:
    """Run the fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `block_d` forces the column block (a power of two); narrower than the row selects the two-pass path.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton normalise kernel needs the triton package")
    _check(x)
    if x.dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton normalise kernel handles float32/float16/bfloat16, got {x.dtype} -> {out_dtype}")
    n, d = x.shape
    out = torch.empty((n, d), dtype=out_dtype, device=x.device)
    if n == 0 or d == 0:
        return out
    bd = block_d or min(next_power_of_2(d), _SINGLE_PASS_MAX)
    bm = max(1, min(16, 4096 // bd))
    _l2_normalize_kernel[(triton.cdiv(n, bm),)](
        x,
        out,
        n,
        d,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        EPS,
        BLOCK_M=bm,
        BLOCK_D=bd,
        SINGLE_PASS=bd >= d,
    )
    return out


def l2_normalize(x: torch.Tensor, out_dtype: torch.dtype = torch.float32, *, backend: Backend = "auto") -> torch.Tensor:
    """Normalise each row of a 2-D tensor to unit L2 norm and cast to `out_dtype`.

    With `backend="auto"` the fused Triton kernel runs for CUDA tensors when triton is installed and
    both dtypes are float32/float16/bfloat16; otherwise the plain-torch reference runs.
    """
    _check(x)
    if backend == "auto" and (x.dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES):
        logger.debug("l2_normalize: no kernel for %s -> %s, using the reference", x.dtype, out_dtype)
        backend = "torch"
    if use_triton(backend, x.device, _l2_normalize_kernel if TRITON_AVAILABLE else None):
        return _l2_normalize_triton(x, out_dtype)
    return l2_normalize_reference(x, out_dtype)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _l2_normalize_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        out_ptr,
        n_rows,
        n_cols,
        stride_xr,
        stride_xc,
        stride_or,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SINGLE_PASS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xr
        out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_or
        cols = tl.arange(0, BLOCK_D)
        if SINGLE_PASS:
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
            norm = tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), eps)
            tl.store(out_rows + cols[None, :], (x / norm[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            sq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK_D):
                c = c0 + cols
                mask = row_mask[:, None] & (c < n_cols)[None, :]
                x = tl.load(x_rows + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
                sq += x * x
            norm = tl.maximum(tl.sqrt_rn(tl.sum(sq, axis=1)), eps)
            for c0 in range(0, n_cols, BLOCK_D):
                c = c0 + cols
                mask = row_mask[:, None] & (c < n_cols)[None, :]
                x = tl.load(x_rows + c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_rows + c[None, :], (x / norm[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
