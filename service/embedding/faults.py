"""Which failures are fatal to the process, as opposed to one image's or one batch's.

One place decides, so that decode (which turns every other exception of an image into that image's error) and
the batcher (which fails only the batch, unless this says otherwise) agree.
"""

from __future__ import annotations

# A CUDA error other than running out of memory is sticky: the context is poisoned and every later kernel launch
# fails (or worse, computes garbage), so the only recovery is a new process. The text is the only portable signal:
# torch, torchvision, DALI and cuBLAS each raise their own exception types with CUDA's message inside.
_FATAL_PHRASES = (
    "cuda error",
    "cudaerror",
    "cuda driver error",
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "gpu has fallen off the bus",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "nvjpeg_status_execution_failed",
)
_RECOVERABLE_PHRASES = ("out of memory",)


def is_fatal(error: BaseException) -> bool:
    """True when `error` (or an exception it was raised from) means the device can no longer be trusted."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if not any(p in text for p in _RECOVERABLE_PHRASES) and any(p in text for p in _FATAL_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


# CPU allocators say it in words of their own: torch's DefaultCPUAllocator, C++ std::bad_alloc, OpenVINO, libc.
_OUT_OF_MEMORY_PHRASES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
    "bad_alloc",
    "failed to allocate",
)


def is_out_of_memory(error: BaseException) -> bool:
    """True when `error` (or an exception it was raised from) is an allocation failure that a smaller batch avoids.

    `MemoryError`, torch's `OutOfMemoryError` (CUDA) and the `RuntimeError`s of the CPU allocators all count; none
    of them is fatal (`is_fatal` says False), so the batcher splits the batch and tries again.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return True
        text = str(current).lower()
        if any(p in text for p in _OUT_OF_MEMORY_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False
