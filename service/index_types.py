"""Plain result types of the vector index, shared by the index (`service.index`) and the client (which must not
import faiss)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Neighbor:
    """One search result: the item's key, its score (cosine: similarity, higher is closer; l2: squared distance,
    lower is closer) and its attributes."""

    key: str
    score: float
    attributes: dict[str, str]


@dataclass(frozen=True, slots=True)
class FetchedItems:
    """Stored items: keys, their vectors (float32, (n, dim), as stored) and attributes, row for row."""

    keys: list[str]
    vectors: np.ndarray
    attributes: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """What `GetCollectionInfo` reports about a collection."""

    name: str
    dim: int
    metric: str
    """`cosine` or `l2`."""
    index_type: str
    """`flat`, `ivf_flat`, `ivf_pq` or `hnsw`."""
    count: int
    trained: bool
    """True when searches use the configured index: always for `flat`; for the others once it is built."""
    bytes_on_disk: int
    search_backend: str
    """`faiss-cpu`, `faiss-gpu`, `torch-cuda`, `torch-cpu` (exact search), or the approximate index in use."""
