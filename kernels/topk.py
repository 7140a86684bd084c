"""Exact top-k search over a matrix of stored vectors, blockwise, without the full score matrix.

`search_topk(queries, database, k, metric)` is the public entry point; `search_topk_reference` is the
plain-torch definition (full matmul per chunk of queries + `torch.topk`).

Semantics shared by every implementation:
- `metric="ip"`: scores are inner products, largest first;
  `metric="l2"`: scores are squared L2 distances ||q||^2 - 2 q.x + ||x||^2 clamped at 0, smallest first;
- scores are computed in float32 (inputs of any float dtype are upcast; the kernel multiplies two
  half-precision inputs natively with float32 accumulation) and returned as float32 (n_q, k);
  indices are int64 (n_q, k);
- when k exceeds the number of database rows, the missing places hold score -inf (ip) or +inf (l2)
  and index -1.
- ties: the Triton kernel returns the lower database index first; the reference follows `torch.topk`,
  which does not define an order among equal scores.

The kernel gives each program a block of queries and a slice of the database. It walks the slice in
tiles, computes a tile of scores with `tl.dot`, and merges it into a running top-K kept in registers
(K = k rounded up to a power of two). Each (score, index) pair is packed into one int64 key whose
order is "better score, then lower index", so one integer comparison ranks both and the index
travels with its score. Per tile, only keys above the running K-th best are inserted, best first,
each replacing the running minimum. The slices' unsorted lists are merged and ordered with one
`torch.topk` over the keys afterwards.
"""

# Triton kernels name compile-time constants in capitals and take many positional arguments.
# ruff: noqa: N803, PLR0917

from __future__ import annotations

import logging
from typing import Literal

import torch

from kernels._triton import (
    TRITON_AVAILABLE,
    Backend,
    Precision,
    check_precision,
    dot_in_fp32,
    next_power_of_2,
    use_triton,
)

logger = logging.getLogger(__name__)

Metric = Literal["ip", "l2"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the Triton kernel handles; others go through the reference."""

MAX_KERNEL_K = 256
"""Largest k the Triton kernel keeps in registers; `search_topk` uses the reference above it."""

_INT64_MIN = -(2**63)
_EMPTY_BELOW = _INT64_MIN + 2**31  # keys below this are the kernel's "no entry" fillers
_REFERENCE_CHUNK = 1 << 24  # elements of the (queries x database) score block the reference holds at once


def _check(queries: torch.Tensor, database: torch.Tensor, k: int, metric: str) -> None:
    if queries.dim() != 2 or database.dim() != 2:
        raise ValueError(
            f"search_topk expects 2-D queries and database, got {tuple(queries.shape)} and {tuple(database.shape)}"
        )
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but the database has {database.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if metric not in ("ip", "l2"):
        raise ValueError(f"unknown metric {metric!r}; use 'ip' or 'l2'")
    if queries.device != database.device:
        raise ValueError(f"queries are on {queries.device} but the database is on {database.device}")
    if database.shape[0] >= 2**31 - 1:
        raise ValueError("search_topk supports fewer than 2**31 - 1 database rows")


def _empty_result(n_q: int, k: int, metric: Metric, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    fill = float("-inf") if metric == "ip" else float("inf")
    scores = torch.full((n_q, k), fill, dtype=torch.float32, device=device)
    return scores, torch.full((n_q, k), -1, dtype=torch.int64, device=device)


def search_topk_reference(
    queries: torch.Tensor, database: torch.Tensor, k: int, metric: Metric = "ip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k database rows per query: (scores float32 (n_q, k), indices int64 (n_q, k)), in plain torch.

    Queries are processed in chunks so that at most ~16M scores are held at once.
    """
    _check(queries, database, k, metric)
    n_q, n_db = queries.shape[0], database.shape[0]
    scores, indices = _empty_result(n_q, k, metric, queries.device)
    kk = min(k, n_db)
    if kk == 0 or n_q == 0:
        return scores, indices
    db = database.float()
    dd = (db * db).sum(dim=1) if metric == "l2" else None
    chunk = max(1, _REFERENCE_CHUNK // n_db)
    for start in range(0, n_q, chunk):
        q = queries[start : start + chunk].float()
        s = q @ db.T
        if dd is not None:
            s = ((q * q).sum(dim=1, keepdim=True) - 2.0 * s + dd).clamp_min_(0.0)
        top = torch.topk(s, kk, dim=1, largest=metric == "ip", sorted=True)
        scores[start : start + chunk, :kk] = top.values
        indices[start : start + chunk, :kk] = top.indices
    return scores, indices


def _decode(keys: torch.Tensor, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack int64 keys (see the module docstring) into (scores float32, indices int64)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32).clone()
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    empty = keys < _EMPTY_BELOW
    if metric == "l2":
        scores = 0.0 - scores  # keys hold -distance; 0 - (+0.0) keeps distances at +0.0
        scores[empty] = float("inf")
    else:
        scores[empty] = float("-inf")
    indices[empty] = -1
    return scores, indices


def _search_topk_triton(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    metric: Metric = "ip",
    *,
    precision: Precision = "ieee",
    block_q: int | None = None,
    block_n: int | None = None,
    block_d: int = 32,
    splits: int | None = None,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the blockwise top-k kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `precision` applies to float32 dot products (see `search_topk`). `splits` database slices are
    searched by separate programs (default: enough to fill the GPU); block sizes are powers of two,
    `block_q`, `block_n` and `block_d` >= 16 (the `tl.dot` minimum); 8 warps keep the default tiles
    free of register spills on sm_90.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton top-k kernel needs the triton package")
    _check(queries, database, k, metric)
    if queries.dtype not in KERNEL_DTYPES or database.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton top-k kernel handles float32/float16/bfloat16, got {queries.dtype}")
    if k > MAX_KERNEL_K:
        raise ValueError(f"the Triton top-k kernel handles k <= {MAX_KERNEL_K}, got {k}")
    check_precision(precision)
    n_q, n_db = queries.shape[0], database.shape[0]
    if n_q == 0 or n_db == 0:
        return _empty_result(n_q, k, metric, queries.device)
    k_pad = next_power_of_2(k)
    # Fewer queries per program for a long running list (registers) or few queries (wasted dot rows).
    bq = block_q or min(64 if k_pad <= 32 else 32 if k_pad <= 128 else 16, max(16, next_power_of_2(n_q)))
    bn = block_n or 64
    if splits is None:
        # About 4 programs per SM, each slice at least 8 tiles long.
        sms = torch.cuda.get_device_properties(queries.device).multi_processor_count if queries.is_cuda else 1
        q_blocks = triton.cdiv(n_q, bq)
        splits = max(1, min(triton.cdiv(4 * sms, q_blocks), triton.cdiv(n_db, 8 * bn)))
    # Each slice is a whole number of tiles, so tiles never straddle two slices.
    per_split = triton.cdiv(triton.cdiv(n_db, splits), bn) * bn
    splits = triton.cdiv(n_db, per_split)
    keys = torch.empty((n_q, splits, k_pad), dtype=torch.int64, device=queries.device)
    _topk_kernel[(triton.cdiv(n_q, bq), splits)](
        queries,
        database,
        keys,
        n_q,
        n_db,
        queries.shape[1],
        per_split,
        queries.stride(0),
        queries.stride(1),
        database.stride(0),
        database.stride(1),
        L2=metric == "l2",
        BLOCK_Q=bq,
        BLOCK_N=bn,
        BLOCK_D=block_d,
        K_PAD=k_pad,
        DOT_FP32=dot_in_fp32(queries, database, _topk_kernel),
        PRECISION=precision,
        num_warps=num_warps,
    )
    ordered = torch.topk(keys.view(n_q, splits * k_pad), k, dim=1, largest=True, sorted=True).values
    return _decode(ordered, metric)


def search_topk(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    metric: Metric = "ip",
    *,
    precision: Precision = "ieee",
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k database rows for each query: (scores float32 (n_q, k), indices int64 (n_q, k)).

    `metric="ip"`: inner products, largest first; `metric="l2"`: squared distances, smallest first.
    Places beyond the database size hold -inf (ip) / +inf (l2) and index -1. With `backend="auto"` the
    blockwise Triton kernel runs for CUDA tensors when triton is installed and k <= MAX_KERNEL_K;
    otherwise the plain-torch reference runs. `precision` is how the kernel multiplies float32 inputs:
    "ieee" (exact float32, the default) or "tf32" (tensor cores, ~1e-3 relative error in the scores);
    half-precision inputs always use tensor cores.
    """
    _check(queries, database, k, metric)
    supported = queries.dtype in KERNEL_DTYPES and database.dtype in KERNEL_DTYPES and k <= MAX_KERNEL_K
    if backend == "auto" and not supported:
        logger.debug("search_topk: no kernel for %s inputs with k=%d, using the reference", queries.dtype, k)
        backend = "torch"
    if use_triton(backend, queries.device, _topk_kernel if TRITON_AVAILABLE else None):
        return _search_topk_triton(queries, database, k, metric, precision=precision)
    check_precision(precision)
    return search_topk_reference(queries, database, k, metric)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _topk_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        db_ptr,
        keys_ptr,
        n_q,
        n_db,
        d,
        per_split,
        stride_qn,
        stride_qd,
        stride_dbn,
        stride_dbd,
        L2: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        K_PAD: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        qrows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = qrows < n_q
        q_rows = q_ptr + qrows.to(tl.int64)[:, None] * stride_qn
        split = tl.program_id(1)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, n_db)
        dims = tl.arange(0, BLOCK_D)
        # Squared norms in float32 inside the kernel (L2 only): no float32 copy of either input.
        qq = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        if L2:
            for d0 in range(0, d, BLOCK_D):
                dd_ = d0 + dims
                qt = tl.load(q_rows + dd_[None, :] * stride_qd, mask=q_mask[:, None] & (dd_ < d)[None, :], other=0.0)
                qt = qt.to(tl.float32)
                qq += tl.sum(qt * qt, axis=1)
        # Distinct "no entry" keys, below every real key (those are >= -2**63 + 2**31).
        running = tl.full((BLOCK_Q, K_PAD), -(2**63), dtype=tl.int64) + tl.arange(0, K_PAD)[None, :]
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < hi
            db_cols = db_ptr + cols.to(tl.int64)[None, :] * stride_dbn
            acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
            dn = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dd_ = d0 + dims
                d_mask = dd_ < d
                qt = tl.load(q_rows + dd_[None, :] * stride_qd, mask=q_mask[:, None] & d_mask[None, :], other=0.0)
                dbt = tl.load(db_cols + dd_[:, None] * stride_dbd, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
                if L2:
                    dbt32 = dbt.to(tl.float32)
                    dn += tl.sum(dbt32 * dbt32, axis=0)
                if DOT_FP32:
                    acc = tl.dot(qt.to(tl.float32), dbt.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(qt, dbt, acc)
            # Larger is better: L2 ranks by -distance. Adding 0.0 turns -0.0 into +0.0 (equal scores, equal keys).
            score = 0.0 - tl.maximum(qq[:, None] - 2.0 * acc + dn[None, :], 0.0) if L2 else acc + 0.0
            # Order-preserving float -> int32 map, then (score, lower index) packed into one int64 key.
            bits = score.to(tl.int32, bitcast=True)
            key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key = (key32.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))[None, :]
            key = tl.where(q_mask[:, None] & col_mask[None, :], key, -(2**63))
            # Only keys above the current K-th best can enter; insert them best first, each replacing
            # the running minimum. The round count is the block's largest number of such keys, which
            # drops to zero for most tiles once the running lists fill with good candidates.
            floor = tl.min(running, axis=1)
            rounds = tl.max(tl.sum((key > floor[:, None]).to(tl.int32), axis=1))
            for _ in range(0, rounds):
                best = tl.max(key, axis=1)
                low = tl.min(running, axis=1)
                take = (best > low)[:, None] & (running == low[:, None])
                running = tl.where(take, best[:, None], running)
                key = tl.where(key == best[:, None], -(2**63), key)
        out = keys_ptr + (qrows.to(tl.int64)[:, None] * tl.num_programs(1) + split) * K_PAD
        tl.store(out + tl.arange(0, K_PAD)[None, :], running, mask=q_mask[:, None])
