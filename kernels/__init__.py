"""Triton kernels for the GPU hot path, each with a plain-torch reference and a fallback."""
