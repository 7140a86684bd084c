"""embedserve: GPU-accelerated image embedding service."""

__version__ = "0.1.0"
