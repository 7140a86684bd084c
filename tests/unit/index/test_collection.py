"""Collections: recovery from snapshot + log replay, snapshots and log rotation, torn logs, and data directories
written before the index was split into modules."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.config import Config
from service.index import records, wal
from service.index.store import IndexStore
from tests.unit.index.reference import (
    DIM,
    V1_DATA_DIR,
    V1_OVERRIDES,
    brute_force,
    check_equal,
    make_cfg,
    populate,
    v1_expected,
    v1_writes,
)


def test_restart_replays_the_log_and_keeps_deletes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    rng = np.random.default_rng(1)
    store = IndexStore.open(cfg)
    store.create_collection("c", dim=DIM)
    vectors, attributes = populate(store, "c", rng, 300)
    store.close(snapshot=False)  # like a crash: only the log holds the items
    assert not (tmp_path / "collections" / "c" / "snapshot.npz").exists()
    with IndexStore.open(cfg) as store:
        items = store.fetch("c")
        assert items.keys == sorted(vectors)
        expected = np.stack([vectors[k] / np.linalg.norm(vectors[k]) for k in items.keys])
        np.testing.assert_allclose(items.vectors, expected, rtol=1e-6)
        assert items.attributes == [attributes[k] for k in items.keys]
        store.delete("c", items.keys[:7])
    with IndexStore.open(cfg) as store:  # restarted from the snapshot written on close
        assert store.count("c") == len(vectors) - 7
        assert not set(items.keys[:7]) & set(store.keys("c"))
        store.drop_collection("c")
    with IndexStore.open(cfg) as store:
        assert store.collections() == []
        assert not (tmp_path / "collections" / "c").exists()


def test_snapshots_rotate_and_truncate_the_log(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, snapshot_every_records=3)
    with IndexStore.open(cfg) as store:
        store.create_collection("c", dim=2)
        for i in range(10):
            store.upsert("c", [f"k{i}"], np.array([[1.0, float(i)]], np.float32))
            store.wait_idle()
        directory = tmp_path / "collections" / "c"
        assert (directory / "snapshot.npz").exists()
        assert len(wal.generations(directory)) == 1  # older generations deleted once the snapshot covers them
        assert store.info("c").bytes_on_disk > 0
    store = IndexStore.open(cfg)
    assert store.keys("c") == [f"k{i}" for i in range(10)]
    store.close(snapshot=False)


def _last_record_span(path: Path) -> tuple[int, int]:
    result = wal.read_generation(path)
    last = len(result.records[-1])
    return result.valid_bytes - last - 8, result.valid_bytes


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_torn_log_tail_is_dropped_with_a_warning(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(tmp_path)
    store = IndexStore.open(cfg)
    store.create_collection("c", dim=4)
    for i in range(5):
        store.upsert("c", [f"k{i}"], np.full((1, 4), i + 1, np.float32))
    store.close(snapshot=False)
    log = wal.log_path(tmp_path / "collections" / "c", wal.generations(tmp_path / "collections" / "c")[-1])
    start, end = _last_record_span(log)
    data = bytearray(log.read_bytes())
    if damage == "truncate":
        data = data[: end - 3]
    elif damage == "flip":
        data[start + 12] ^= 0xFF
    else:  # a record header announcing more bytes than were written, as a crash mid-write leaves
        data += (1000).to_bytes(4, "little") + b"\x00" * 9
    log.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="service.index.wal"):
        store = IndexStore.open(cfg)
    assert "dropping" in caplog.text
    expected = [f"k{i}" for i in range(5 if damage == "garbage" else 4)]
    assert store.keys("c") == expected
    store.upsert("c", ["after"], np.ones((1, 4), np.float32))  # appends continue after the last good record
    store.close(snapshot=False)
    with IndexStore.open(cfg) as store:
        assert store.keys("c") == sorted([*expected, "after"])


def test_a_record_that_passes_its_checksum_but_does_not_parse_stops_the_open(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    with IndexStore.open(cfg) as store:
        store.create_collection("c", dim=4)
    directory = tmp_path / "collections" / "c"
    log = wal.WriteAheadLog(directory, wal.generations(directory)[-1])
    log.append(records.encode_delete(["x"])[:-1])  # framed and checksummed, but the JSON is cut short
    log.close()
    with pytest.raises(records.CorruptRecordError, match=r"collection 'c'.*not JSON"):
        IndexStore.open(cfg)


def _v1_copy(tmp_path: Path) -> Path:
    data_dir = tmp_path / "v1"
    shutil.copytree(V1_DATA_DIR, data_dir)
    return data_dir


def _v1_cfg(data_dir: Path) -> Config:
    return make_cfg(data_dir, **{key.split(".", 1)[1]: value for key, value in V1_OVERRIDES.items()})


def test_a_data_dir_written_before_the_split_still_opens(tmp_path: Path) -> None:
    data_dir = _v1_copy(tmp_path)
    expected = v1_expected()
    with IndexStore.open(_v1_cfg(data_dir)) as store:
        assert [c.name for c in store.collections()] == ["ann", "oct"]
        oct_items = store.fetch("oct")
        model = expected["oct"]
        assert oct_items.keys == sorted(model.vectors)  # includes the keys written after the snapshot
        want = np.stack([model.vectors[k] / np.linalg.norm(model.vectors[k]) for k in oct_items.keys])
        np.testing.assert_allclose(oct_items.vectors, want, rtol=1e-6)
        assert oct_items.attributes == [model.attributes[k] for k in oct_items.keys]
        info = store.info("ann")
        assert info.trained and info.search_backend == "ivf_flat" and info.count == 290
        ann = expected["ann"]
        queries = np.random.default_rng(5).normal(size=(8, 8)).astype(np.float32)
        for flt in ("", "g == 1"):
            check_equal(
                store.search("ann", queries, 5, filter=flt),
                brute_force(ann.vectors, ann.attributes, queries, 5, "l2", flt),
            )
        store.upsert("oct", ["new"], np.ones((1, 4), np.float32))
    with IndexStore.open(_v1_cfg(data_dir)) as store:
        assert store.count("oct") == len(expected["oct"].vectors) + 1


def test_the_same_writes_today_give_the_same_files(tmp_path: Path) -> None:
    """Log bytes, collection.json and snapshot arrays are what the index wrote before the split."""
    data_dir = tmp_path / "today"
    store = IndexStore.open(_v1_cfg(data_dir))
    store.create_collection("oct", dim=4, metric="cosine", index_type="flat")
    store.create_collection("ann", dim=8, metric="l2", index_type="ivf_flat")

    def snapshot(name: str) -> None:
        store.wait_idle()
        store.snapshot(name)

    v1_writes(store, snapshot)
    store.close(snapshot=False)
    for name in ("oct", "ann"):
        old, new = V1_DATA_DIR / "collections" / name, data_dir / "collections" / name
        assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
        for file in ("collection.json", "wal-00000002.log"):
            assert (new / file).read_bytes() == (old / file).read_bytes(), file
        with np.load(old / "snapshot.npz") as before, np.load(new / "snapshot.npz") as after:
            assert list(after.keys()) == list(before.keys()) == ["meta", "records", "vectors", "ids", "ann"]
            for array in ("meta", "records", "vectors", "ids"):
                assert after[array].dtype == before[array].dtype
                assert after[array].tobytes() == before[array].tobytes(), array
            assert (after["ann"].size > 0) == (before["ann"].size > 0) == (name == "ann")
        meta = json.loads((new / "collection.json").read_text())
        assert meta["name"] == name
