"""Triton availability and the backend choice shared by every kernel module.

Availability is decided once, when this module is imported: `TRITON_AVAILABLE` is True when the
`triton` package imports. A call then runs the Triton kernel when

- `backend="auto"` (the default) and the inputs are CUDA tensors (a CUDA tensor implies a GPU), or
- `backend="triton"`: CUDA tensors, or CPU tensors when the kernels were defined under the Triton
  interpreter (`TRITON_INTERPRET=1` set before `kernels` was imported; that is how CI runs them).

`backend="torch"` always runs the plain-torch reference; so does `"auto"` on CPU tensors, even under
the interpreter, because the interpreter is a testing tool and far slower than the reference.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Backend = Literal["auto", "triton", "torch"]
Precision = Literal["ieee", "tf32"]
"""How a kernel multiplies float32 inputs in `tl.dot`: exact float32, or TF32 tensor cores."""

try:
    import triton  # noqa: F401  (imported to probe availability)
except ImportError:  # pragma: no cover - triton ships with the standard torch wheel on Linux
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` was decorated under the Triton interpreter (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(backend: Backend, device: torch.device, kernel: Any) -> bool:
    """Decide whether to run the Triton `kernel` for inputs on `device` (see the module docstring).

    Raises ValueError for an unknown backend and RuntimeError when `backend="triton"` cannot be honoured.
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return TRITON_AVAILABLE and device.type == "cuda"
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'triton' or 'torch'")
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    if device.type == "cuda":
        return True
    if device.type == "cpu" and is_interpreted(kernel):
        return True
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors (got {device.type}); to run the kernels on CPU tensors, "
        "set TRITON_INTERPRET=1 before importing kernels"
    )


def check_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is "ieee" or "tf32"."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"unknown precision {precision!r}; use 'ieee' (exact float32) or 'tf32'")


def dot_in_fp32(a: torch.Tensor, b: torch.Tensor, kernel: Any) -> bool:
    """Whether `kernel` should upcast both `tl.dot` operands to float32 (float32 or mixed inputs).

    Two float16 or two bfloat16 inputs use the native half-precision dot with float32 accumulation,
    except bfloat16 under the interpreter, whose `tl.dot` multiplies bfloat16 bit patterns as integers.
    """
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        return True
    return a.dtype == torch.bfloat16 and is_interpreted(kernel)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
