"""Snapshots of a collection: `snapshot.npz` in its directory, written atomically, read back on open.

The file is an uncompressed `.npz` (`np.savez`) of five arrays, in this order:
- `meta`: uint8 JSON `{"version": 1, "generation": <first log generation not covered>, "next_id": <int>,
  "spec": <the collection spec>}`;
- `records`: uint8 JSON `{"keys": [...], "attributes": [{...}, ...]}`, one entry per row;
- `vectors`: float32 (n, dim); `ids`: int64 (n,);
- `ann`: uint8, the approximate index as `faiss.serialize_index` writes it (empty when none is built).
It is written to `snapshot.npz.tmp`, fsync'd, renamed over `snapshot.npz` and the directory fsync'd
(`service.files.write_atomic`), so a crash leaves the previous snapshot or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.errors import InvalidIndexRequestError
from service.files import write_atomic
from service.index.rows import RowStore

SNAPSHOT_NAME = "snapshot.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    """A consistent copy of a collection's rows (and its built approximate index, serialised)."""

    generation: int
    """The first log generation the snapshot does not cover (replay starts there)."""
    next_id: int
    vectors: np.ndarray
    ids: np.ndarray
    keys: list[str]
    attributes: list[dict[str, str]]
    ann: np.ndarray | None
    """`faiss.serialize_index` of the approximate index, or None when none is built."""

    @classmethod
    def capture(cls, rows: RowStore, ann: Any, generation: int) -> Snapshot:
        """Copy `rows` and serialise `ann` (call under the lock that guards them)."""
        return cls(
            generation=generation,
            next_id=rows.next_id,
            vectors=rows.live_vectors.copy(),
            ids=rows.live_ids.copy(),
            keys=list(rows.keys),
            attributes=[dict(a) for a in rows.attributes],
            ann=faiss.serialize_index(ann) if ann is not None else None,
        )

    def restore_rows(self) -> RowStore:
        """The rows this snapshot holds."""
        return RowStore.from_arrays(
            vectors=self.vectors, ids=self.ids, keys=self.keys, attributes=self.attributes, next_id=self.next_id
        )

    def restore_ann(self) -> Any:
        """The approximate index this snapshot holds, or None."""
        return faiss.deserialize_index(self.ann) if self.ann is not None else None


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, separators=(",", ":")).encode(), dtype=np.uint8)


def write_snapshot(path: Path, snapshot: Snapshot, spec: Mapping[str, Any]) -> None:
    """Write `snapshot` (with the collection's `spec` in its metadata) atomically to `path`."""
    meta = {
        "version": FORMAT_VERSION,
        "generation": snapshot.generation,
        "next_id": snapshot.next_id,
        "spec": dict(spec),
    }
    arrays: dict[str, Any] = {
        "meta": _json_bytes(meta),
        "records": _json_bytes({"keys": snapshot.keys, "attributes": snapshot.attributes}),
        "vectors": snapshot.vectors,
        "ids": snapshot.ids,
        "ann": snapshot.ann if snapshot.ann is not None else np.zeros(0, np.uint8),
    }
    write_atomic(path, lambda handle: np.savez(handle, **arrays))


def read_snapshot(path: Path, dim: int) -> Snapshot:
    """Read a snapshot of a collection of `dim`-d vectors; raises `InvalidIndexRequestError` when it is
    inconsistent."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes())
        records = json.loads(data["records"].tobytes())
        vectors = np.ascontiguousarray(data["vectors"], dtype=np.float32)
        ids = np.ascontiguousarray(data["ids"], dtype=np.int64)
        ann = data["ann"]
    keys, attributes = records["keys"], records["attributes"]
    if vectors.shape != (len(keys), dim) or len(ids) != len(keys) or len(attributes) != len(keys):
        raise InvalidIndexRequestError(f"snapshot {path} is inconsistent: {vectors.shape} vectors, {len(keys)} keys")
    return Snapshot(
        generation=int(meta["generation"]),
        next_id=int(meta["next_id"]),
        vectors=vectors,
        ids=ids,
        keys=list(keys),
        attributes=[dict(a) for a in attributes],
        ann=ann if ann.size else None,
    )


def remove_partial(directory: Path) -> None:
    """Delete what a snapshot write cut short by a crash left (`*.tmp`); the previous snapshot and the log are
    intact."""
    for leftover in directory.glob("*.tmp"):
        leftover.unlink()
