"""Snapshots on their own (a directory, no store): round trip, the npz layout, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from service.errors import InvalidIndexRequestError
from service.files import write_atomic
from service.index import snapshot
from service.index.backends import AnnParams, build_ann
from service.index.rows import RowStore

SPEC = {"name": "c", "dim": 6, "metric": "l2"}


def rows_with_items(n: int = 300, seed: int = 0) -> RowStore:
    rng = np.random.default_rng(seed)
    rows = RowStore(6)
    keys = [f"k{i}" for i in range(n)] + ["Ωμέγα/画像.jpeg"]
    rows.upsert(keys, rng.normal(size=(len(keys), 6)).astype(np.float32), [{"i": str(i)} for i in range(len(keys))])
    rows.delete(keys[10:20])
    rows.upsert(keys[:5], rng.normal(size=(5, 6)).astype(np.float32), [{}] * 5)
    return rows


def test_round_trip_restores_rows_and_index(tmp_path: Path) -> None:
    rows = rows_with_items()
    params = AnnParams(index_type="ivf_flat", dim=6, nlist=4, pq_m=2, pq_nbits=8, hnsw_m=16, ef_construction=40)
    ann = build_ann(params, rows.live_vectors.copy(), rows.live_ids.copy())
    saved = snapshot.Snapshot.capture(rows, ann, generation=7)
    path = tmp_path / snapshot.SNAPSHOT_NAME
    snapshot.write_snapshot(path, saved, SPEC)
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot.SNAPSHOT_NAME]  # no .tmp left behind
    loaded = snapshot.read_snapshot(path, 6)
    assert loaded.generation == 7 and loaded.next_id == rows.next_id
    restored = loaded.restore_rows()
    assert restored.count == rows.count and restored.keys == rows.keys and restored.attributes == rows.attributes
    assert restored.live_vectors.tobytes() == rows.live_vectors.tobytes()
    assert restored.live_ids.tolist() == rows.live_ids.tolist()
    assert restored.row_of_key == rows.row_of_key and restored.row_of_id == rows.row_of_id
    index = loaded.restore_ann()
    queries = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    assert index.ntotal == ann.ntotal
    np.testing.assert_array_equal(index.search(queries, 5)[1], ann.search(queries, 5)[1])


def test_the_npz_layout(tmp_path: Path) -> None:
    """The layout the module docstring documents (data directories hold it): read with plain numpy and json."""
    rows = rows_with_items(20)
    path = tmp_path / snapshot.SNAPSHOT_NAME
    snapshot.write_snapshot(path, snapshot.Snapshot.capture(rows, None, generation=3), SPEC)
    with np.load(path) as data:
        assert list(data.keys()) == ["meta", "records", "vectors", "ids", "ann"]
        meta = json.loads(data["meta"].tobytes())
        assert meta == {"version": 1, "generation": 3, "next_id": rows.next_id, "spec": SPEC}
        assert data["meta"].dtype == np.uint8 and data["ann"].dtype == np.uint8 and data["ann"].size == 0
        assert json.loads(data["records"].tobytes()) == {"keys": rows.keys, "attributes": rows.attributes}
        assert data["vectors"].dtype == np.float32 and data["vectors"].tobytes() == rows.live_vectors.tobytes()
        assert data["ids"].dtype == np.int64 and data["ids"].tolist() == rows.live_ids.tolist()
    assert snapshot.read_snapshot(path, 6).restore_ann() is None


def test_an_empty_collection(tmp_path: Path) -> None:
    path = tmp_path / snapshot.SNAPSHOT_NAME
    snapshot.write_snapshot(path, snapshot.Snapshot.capture(RowStore(6), None, generation=1), SPEC)
    restored = snapshot.read_snapshot(path, 6).restore_rows()
    assert restored.count == 0 and restored.keys == [] and restored.next_id == 0


def test_a_write_cut_short_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    path = tmp_path / snapshot.SNAPSHOT_NAME
    first = rows_with_items(30)
    snapshot.write_snapshot(path, snapshot.Snapshot.capture(first, None, generation=2), SPEC)

    def crash(handle: IO[Any]) -> None:
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, crash)  # the path `write_snapshot` takes, failing half-way
    assert (tmp_path / (snapshot.SNAPSHOT_NAME + ".tmp")).exists()
    assert snapshot.read_snapshot(path, 6).restore_rows().keys == first.keys
    snapshot.remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot.SNAPSHOT_NAME]


def test_an_inconsistent_snapshot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / snapshot.SNAPSHOT_NAME
    snapshot.write_snapshot(path, snapshot.Snapshot.capture(rows_with_items(8), None, generation=1), SPEC)
    with pytest.raises(InvalidIndexRequestError, match="inconsistent"):
        snapshot.read_snapshot(path, 5)  # a collection of another dimension
