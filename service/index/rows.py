"""The in-memory items of one collection: a dense float32 matrix with ids, keys and attributes per row.

Rows are dense (0..count-1; a delete moves the last row into the hole, so there are no tombstones to compact).
Each stored version of an item gets a new, never reused id: approximate indexes address items by id, and ids that
are no longer live are excluded from their searches until the next rebuild.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class RowStore:
    """Vectors, ids, keys and attributes of the live items. Not thread-safe: the owning collection locks it.

    `vectors[:count]` and `ids[:count]` are the live rows (the arrays have spare capacity beyond). `version` changes
    with every write, so that device copies of the vectors know when they are stale.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vectors = np.zeros((0, dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self.count = 0
        self.keys: list[str] = []
        self.attributes: list[dict[str, str]] = []
        self.row_of_key: dict[str, int] = {}
        self.row_of_id: dict[int, int] = {}
        self.next_id = 0
        self.version = 0

    @classmethod
    def from_arrays(
        cls,
        *,
        vectors: np.ndarray,
        ids: np.ndarray,
        keys: Sequence[str],
        attributes: Sequence[Mapping[str, str]],
        next_id: int,
    ) -> RowStore:
        """Rows holding exactly these items (as loaded from a snapshot)."""
        n, dim = vectors.shape
        if not len(ids) == len(keys) == len(attributes) == n:
            raise ValueError(f"{n} vectors, {len(ids)} ids, {len(keys)} keys and {len(attributes)} attribute maps")
        store = cls(dim)
        store.reserve(n)
        store.vectors[:n] = vectors
        store.ids[:n] = ids
        store.count = n
        store.keys = list(keys)
        store.attributes = [dict(a) for a in attributes]
        store.row_of_key = {key: row for row, key in enumerate(store.keys)}
        store.row_of_id = {int(i): row for row, i in enumerate(store.ids[:n].tolist())}
        store.next_id = next_id
        return store

    @property
    def live_vectors(self) -> np.ndarray:
        """The vectors of the live rows (a view)."""
        return self.vectors[: self.count]

    @property
    def live_ids(self) -> np.ndarray:
        """The ids of the live rows (a view)."""
        return self.ids[: self.count]

    def reserve(self, n: int) -> None:
        """Make room for `n` rows (capacity at least doubles, so appends are amortised O(1))."""
        if n <= self.vectors.shape[0]:
            return
        capacity = max(n, 2 * self.vectors.shape[0], 1024)
        vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        vectors[: self.count] = self.vectors[: self.count]
        ids = np.zeros(capacity, dtype=np.int64)
        ids[: self.count] = self.ids[: self.count]
        self.vectors, self.ids = vectors, ids

    def upsert(self, keys: Sequence[str], vectors: np.ndarray, attributes: Sequence[dict[str, str]]) -> np.ndarray:
        """Insert or replace items (a key repeated within one call ends with its last version); returns the new
        ids, one per key."""
        self.reserve(self.count + len(keys))
        new_ids = np.arange(self.next_id, self.next_id + len(keys), dtype=np.int64)
        self.next_id += len(keys)
        for key, vector, attrs, new_id in zip(keys, vectors, attributes, new_ids.tolist(), strict=True):
            row = self.row_of_key.get(key)
            if row is None:
                row = self.count
                self.count += 1
                self.keys.append(key)
                self.attributes.append(attrs)
                self.row_of_key[key] = row
            else:
                del self.row_of_id[int(self.ids[row])]
                self.attributes[row] = attrs
            self.vectors[row] = vector
            self.ids[row] = new_id
            self.row_of_id[new_id] = row
        self.version += 1
        return new_ids

    def delete(self, keys: Sequence[str]) -> int:
        """Delete the items with these keys (unknown keys are ignored); returns how many existed."""
        deleted = 0
        for key in keys:
            row = self.row_of_key.pop(key, None)
            if row is None:
                continue
            deleted += 1
            del self.row_of_id[int(self.ids[row])]
            last = self.count - 1
            if row != last:
                moved_key = self.keys[last]
                self.vectors[row] = self.vectors[last]
                self.ids[row] = self.ids[last]
                self.keys[row] = moved_key
                self.attributes[row] = self.attributes[last]
                self.row_of_key[moved_key] = row
                self.row_of_id[int(self.ids[row])] = row
            self.keys.pop()
            self.attributes.pop()
            self.count -= 1
        self.version += 1
        return deleted

    def rows_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """The row of each id (any shape), -1 where the id is not live."""
        get = self.row_of_id.get
        rows = np.fromiter((get(int(i), -1) for i in ids.ravel()), dtype=np.int64, count=ids.size)
        return rows.reshape(ids.shape)
