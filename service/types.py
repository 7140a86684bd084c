"""Records shared across layers: model info, per-image outcomes, index results.

Torch-free on purpose: the client, the wire conversions and the CLI import these without loading torch,
PIL or faiss (numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from service.errors import ImageError


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


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine runs, for `GetModelInfo` and for the metadata of written files."""

    backbone: str
    embedding_dim: int
    input_size: int
    precision: str
    device: str
    decode_backend: str
    resize: str
    pad: str
    version: str


@dataclass(slots=True)
class EmbedOutcome:
    """The result for one image: a unit-norm float32 vector, or the error that image alone hit."""

    vector: np.ndarray | None = None
    error: ImageError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Loadable(Protocol):
    """An input of `embed_iter`: `load()` returns the encoded bytes or raises `ImageError` (e.g. unreadable file)."""

    def load(self) -> bytes: ...


ItemT = TypeVar("ItemT", bound=Loadable)


def load_item(item: Loadable) -> bytes | ImageError:
    """`item.load()`, or the `ImageError` it raised."""
    try:
        return item.load()
    except ImageError as e:
        return e


@dataclass(slots=True)
class Embedded(Generic[ItemT]):
    """An input item paired with its outcome, as `embed_iter` yields them."""

    item: ItemT
    outcome: EmbedOutcome
