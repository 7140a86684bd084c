"""K-means steps: assignment (distances + argmin, fused) and centroid update.

Public entry points: `kmeans_assign(x, centroids) -> (labels, min_sq_dist)` and
`kmeans_update(x, labels, k) -> (centroids, counts)`; the plain-torch definitions are
`kmeans_assign_reference` and `kmeans_update_reference`.

Semantics shared by every implementation:
- squared distances are ||x||^2 - 2 x.c + ||c||^2 in float32 (inputs of any float dtype are upcast;
  the kernel multiplies two half-precision inputs natively with float32 accumulation), clamped at 0;
- ties go to the lowest centroid index (as `torch.argmin`);
- `kmeans_update` returns float32 centroids (the mean of each cluster's points) and int64 counts. An
  empty cluster (count 0) gets the row of `previous` when given, else zeros; the caller sees the zero
  count and can re-seed it.

The assignment kernel streams over the centroids in tiles, keeping a running (min, argmin) per point,
so the n x k distance matrix is never stored. The update kernel sorts the points by label once and
sums each cluster's contiguous segment (deterministic, no atomics); long segments are split across
programs and the partial sums added afterwards.
"""

# Triton kernels name compile-time constants in capitals and take many positional arguments.
# ruff: noqa: N803, PLR0917

from __future__ import annotations

import logging

import torch

from kernels._triton import TRITON_AVAILABLE, Backend, Precision, check_precision, dot_in_fp32, use_triton

logger = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the Triton kernels handle; others go through the reference."""

_REFERENCE_CHUNK = 1 << 24  # elements of the (rows x k) distance block the reference holds at once


def _check_assign(x: torch.Tensor, centroids: torch.Tensor) -> None:
    if x.dim() != 2 or centroids.dim() != 2:
        raise ValueError(
            f"kmeans_assign expects 2-D x and centroids, got {tuple(x.shape)} and {tuple(centroids.shape)}"
        )
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but centroids have {centroids.shape[1]}")
    if centroids.shape[0] == 0:
        raise ValueError("kmeans_assign needs at least one centroid")
    if x.device != centroids.device:
        raise ValueError(f"x is on {x.device} but centroids are on {centroids.device}")


def _check_update(x: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"kmeans_update expects a 2-D x, got shape {tuple(x.shape)}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if labels.device != x.device:
        raise ValueError(f"x is on {x.device} but labels are on {labels.device}")


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of `x`: (labels int64, squared distance float32), in plain torch.

    Rows are processed in chunks so that at most ~16M distances are held at once.
    """
    _check_assign(x, centroids)
    c = centroids.float()
    cc = (c * c).sum(dim=1)
    n, k = x.shape[0], c.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    chunk = max(1, _REFERENCE_CHUNK // k)
    for start in range(0, n, chunk):
        xc = x[start : start + chunk].float()
        d = ((xc * xc).sum(dim=1, keepdim=True) - 2.0 * (xc @ c.T) + cc).clamp_min_(0.0)
        idx = torch.argmin(d, dim=1)
        labels[start : start + chunk] = idx
        dists[start : start + chunk] = d.gather(1, idx[:, None])[:, 0]
    return labels, dists


def _finish_update(
    sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    centroids = sums / counts.clamp_min(1).to(torch.float32)[:, None]
    if previous is not None:
        if previous.shape != centroids.shape:
            raise ValueError(
                f"previous centroids must have shape {tuple(centroids.shape)}, got {tuple(previous.shape)}"
            )
        centroids = torch.where((counts == 0)[:, None], previous.to(centroids), centroids)
    return centroids, counts


def _counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    counts = torch.bincount(labels, minlength=k)
    if counts.shape[0] > k:
        raise ValueError(f"labels must be < k={k}, got {counts.shape[0] - 1}")
    return counts


def kmeans_update_reference(
    x: torch.Tensor, labels: torch.Tensor, k: int, *, previous: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster: (centroids float32 (k, d), counts int64 (k,)), in plain torch.

    Empty clusters get `previous[j]` when `previous` is given, else zeros.
    """
    _check_update(x, labels, k)
    labels = labels.long()
    counts = _counts(labels, k)
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.float())
    return _finish_update(sums, counts, previous)


def _kmeans_assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    precision: Precision = "ieee",
    block_n: int = 64,
    block_k: int = 64,
    block_d: int = 32,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the streaming assignment kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `precision` applies to float32 dot products (see `kmeans_assign`). Block sizes are powers of two
    >= 16 (the minimum tile of `tl.dot`); 8 warps keep the 64x64 tile free of register spills on sm_90.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton K-means kernels need the triton package")
    _check_assign(x, centroids)
    if x.dtype not in KERNEL_DTYPES or centroids.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton assignment kernel handles float32/float16/bfloat16, got {x.dtype}")
    check_precision(precision)
    n, d = x.shape
    k = centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return labels, dists
    _kmeans_assign_kernel[(triton.cdiv(n, block_n),)](
        x,
        centroids,
        labels,
        dists,
        n,
        k,
        d,
        x.stride(0),
        x.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        DOT_FP32=dot_in_fp32(x, centroids, _kmeans_assign_kernel),
        PRECISION=precision,
        num_warps=num_warps,
    )
    return labels, dists


def _kmeans_update_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    previous: torch.Tensor | None = None,
    split: int | None = None,
    block_n: int = 32,
    block_d: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the segmented-sum update kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `split` programs share each cluster's segment (default: enough to fill the GPU).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton K-means kernels need the triton package")
    _check_update(x, labels, k)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton update kernel handles float32/float16/bfloat16, got {x.dtype}")
    n, d = x.shape
    labels = labels.long()
    counts = _counts(labels, k)
    if n == 0 or d == 0:
        return _finish_update(torch.zeros((k, d), dtype=torch.float32, device=x.device), counts, previous)
    order = torch.sort(labels, stable=True).indices
    starts = torch.zeros(k + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, dim=0, out=starts[1:])
    d_tiles = triton.cdiv(d, block_d)
    if split is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        # Enough programs for ~4 per SM, but each keeps a few blocks of rows to sum.
        split = max(1, min(64, triton.cdiv(4 * sms, k * d_tiles), triton.cdiv(n, 4 * block_n * k)))
    partial = torch.empty((split, k, d), dtype=torch.float32, device=x.device)
    _segment_sum_kernel[(k, d_tiles, split)](
        x,
        order,
        starts,
        partial,
        k,
        d,
        x.stride(0),
        x.stride(1),
        SPLIT=split,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    sums = partial[0] if split == 1 else partial.sum(dim=0)
    return _finish_update(sums, counts, previous)


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, precision: Precision = "ieee", backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of `x`: (labels int64 (n,), squared distance float32 (n,)).

    Ties go to the lowest centroid index. With `backend="auto"` the streaming Triton kernel runs for
    CUDA tensors when triton is installed; otherwise the plain-torch reference runs. `precision` is
    how the kernel multiplies float32 inputs: "ieee" (exact float32, the default) or "tf32" (tensor
    cores, ~1e-3 relative error in the dot products); half-precision inputs always use tensor cores.
    """
    _check_assign(x, centroids)
    if backend == "auto" and (x.dtype not in KERNEL_DTYPES or centroids.dtype not in KERNEL_DTYPES):
        logger.debug("kmeans_assign: no kernel for %s/%s inputs, using the reference", x.dtype, centroids.dtype)
        backend = "torch"
    if use_triton(backend, x.device, _kmeans_assign_kernel if TRITON_AVAILABLE else None):
        return _kmeans_assign_triton(x, centroids, precision=precision)
    check_precision(precision)
    return kmeans_assign_reference(x, centroids)


def kmeans_update(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    previous: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each of `k` clusters: (centroids float32 (k, d), counts int64 (k,)).

    An empty cluster gets `previous[j]` when `previous` is given, else zeros (its count is 0, so the
    caller can re-seed it). With `backend="auto"` the Triton kernel runs for CUDA tensors when triton
    is installed; otherwise the plain-torch reference runs.
    """
    _check_update(x, labels, k)
    if backend == "auto" and x.dtype not in KERNEL_DTYPES:
        logger.debug("kmeans_update: no kernel for %s inputs, using the reference", x.dtype)
        backend = "torch"
    if use_triton(backend, x.device, _segment_sum_kernel if TRITON_AVAILABLE else None):
        return _kmeans_update_triton(x, labels, k, previous=previous)
    return kmeans_update_reference(x, labels, k, previous=previous)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _kmeans_assign_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        c_ptr,
        labels_ptr,
        dists_ptr,
        n,
        k,
        d,
        stride_xn,
        stride_xd,
        stride_ck,
        stride_cd,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
        dims = tl.arange(0, BLOCK_D)
        # Squared norms in float32 inside the kernel: no float32 copy of x or of the centroids.
        xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + dims
            xt = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & (dd < d)[None, :], other=0.0)
            xt = xt.to(tl.float32)
            xx += tl.sum(xt * xt, axis=1)
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < k
            c_cols = c_ptr + cols.to(tl.int64)[None, :] * stride_ck
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            cc = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dd = d0 + dims
                d_mask = dd < d
                xt = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                ct = tl.load(c_cols + dd[:, None] * stride_cd, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
                ct32 = ct.to(tl.float32)
                cc += tl.sum(ct32 * ct32, axis=0)
                if DOT_FP32:
                    acc = tl.dot(xt.to(tl.float32), ct32, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(xt, ct, acc)
            dist = tl.maximum(xx[:, None] - 2.0 * acc + cc[None, :], 0.0)
            dist = tl.where(col_mask[None, :], dist, float("inf"))
            tile_min = tl.min(dist, axis=1)
            tile_arg = tl.argmin(dist, axis=1, tie_break_left=True)
            # Strictly smaller only: an equal distance in a later tile has a higher index, and loses.
            better = tile_min < best
            best = tl.where(better, tile_min, best)
            best_idx = tl.where(better, tile_arg + k0, best_idx)
        tl.store(labels_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
        tl.store(dists_ptr + rows, best, mask=row_mask)

    @triton.jit
    def _segment_sum_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        order_ptr,
        starts_ptr,
        partial_ptr,
        k,
        d,
        stride_xn,
        stride_xd,
        SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        cluster = tl.program_id(0)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = dd < d
        part = tl.program_id(2)
        start = tl.load(starts_ptr + cluster)
        end = tl.load(starts_ptr + cluster + 1)
        per = (end - start + SPLIT - 1) // SPLIT
        lo = start + part * per
        hi = tl.minimum(lo + per, end)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for i in range(lo, hi, BLOCK_N):
            pos = i + tl.arange(0, BLOCK_N)
            pos_mask = pos < hi
            rows = tl.load(order_ptr + pos, mask=pos_mask, other=0)
            ptrs = x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd
            acc += tl.load(ptrs, mask=pos_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        out = partial_ptr + (part * k + cluster).to(tl.int64) * d + dd
        tl.store(out, tl.sum(acc, axis=0), mask=d_mask)
