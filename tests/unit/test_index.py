"""The vector index: exact search against brute-force numpy, upserts and deletes, filters, durability."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.config import Config, load_config
from service.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DataDirLockedError,
    EmbedServeError,
    InvalidIndexRequestError,
    KeyNotFoundError,
)
from service.index import wal
from service.index.filter import parse_filter
from service.index.store import IndexStore

DIM = 24


def make_cfg(data_dir: Path, **index: Any) -> Config:
    return load_config(env={}, overrides={"data_dir": str(data_dir), **{f"index.{k}": v for k, v in index.items()}})


def brute_force(
    vectors: dict[str, np.ndarray],
    attributes: dict[str, dict[str, str]],
    queries: np.ndarray,
    k: int,
    metric: str,
    flt: str = "",
) -> list[list[tuple[str, float]]]:
    """Independent reference: score every live item in float64, keep the matching ones, sort."""
    parsed = parse_filter(flt)
    keys = [key for key in sorted(vectors) if parsed is None or parsed.matches(attributes[key])]
    if not keys:
        return [[] for _ in queries]
    base = np.stack([vectors[key] for key in keys]).astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ base.T
        order = np.argsort(-scores, axis=1)
    else:
        scores = ((q[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1)
    return [[(keys[j], float(scores[i, j])) for j in order[i, :k]] for i in range(len(queries))]


def check_equal(got: list[list[Any]], expected: list[list[tuple[str, float]]]) -> None:
    for hits, ref in zip(got, expected, strict=True):
        assert [h.key for h in hits] == [key for key, _ in ref]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in ref], rtol=1e-4, atol=1e-4)


def populate(store: IndexStore, name: str, rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    """n items, then replace a tenth of them (new vectors and attributes) and delete another tenth."""
    keys = [f"item-{i:05d}" for i in range(n)]
    vectors = {key: rng.normal(size=DIM).astype(np.float32) for key in keys}
    attributes = {key: {"label": "abcd"[i % 4], "patient": str(i % 13)} for i, key in enumerate(keys)}
    for start in range(0, n, 500):
        chunk = keys[start : start + 500]
        store.upsert(name, chunk, np.stack([vectors[k] for k in chunk]), [attributes[k] for k in chunk])
    replaced = keys[::10]
    for key in replaced:
        vectors[key] = rng.normal(size=DIM).astype(np.float32)
        attributes[key] = {"label": "d", "patient": "7"}
    store.upsert(name, replaced, np.stack([vectors[k] for k in replaced]), [attributes[k] for k in replaced])
    deleted = keys[5::10]
    assert store.delete(name, [*deleted, "never-stored"]) == len(deleted)
    for key in deleted:
        del vectors[key], attributes[key]
    return vectors, attributes


FILTERS = ["", "label == a", "label == b and patient != 7", "label == a or label == d", "label == nothing"]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_search_equals_brute_force_after_upserts_and_deletes(tmp_path: Path, metric: str, backend: str) -> None:
    rng = np.random.default_rng(0)
    cfg = make_cfg(tmp_path, metric=metric, exact_backend=backend, device="cpu")
    with IndexStore.open(cfg) as store:
        store.create_collection("c", dim=DIM)
        vectors, attributes = populate(store, "c", rng, 2000)
        assert store.count("c") == len(vectors) == 1800
        queries = rng.normal(size=(16, DIM)).astype(np.float32)
        for flt in FILTERS:
            got = store.search("c", queries, 10, filter=flt)
            check_equal(got, brute_force(vectors, attributes, queries, 10, metric, flt))
        info = store.info("c")
        assert info.search_backend == ("faiss-cpu" if backend == "faiss" else "torch-cpu")
    # The same answers after a restart (snapshot on close).
    with IndexStore.open(cfg) as store:
        for flt in FILTERS[:2]:
            expected = brute_force(vectors, attributes, queries, 10, metric, flt)
            check_equal(store.search("c", queries, 10, filter=flt), expected)


def test_k_beyond_the_collection_and_exclusions(tmp_path: Path) -> None:
    with IndexStore.open(make_cfg(tmp_path)) as store:
        store.create_collection("c", dim=3)
        store.upsert("c", ["x", "y"], np.eye(3, dtype=np.float32)[:2], [{"label": "1"}, {"label": "2"}])
        hits = store.search("c", np.eye(3, dtype=np.float32)[:1], 5)[0]
        assert [h.key for h in hits] == ["x", "y"] and hits[0].score == pytest.approx(1.0)
        assert hits[0].attributes == {"label": "1"}
        hits = store.search("c", np.eye(3, dtype=np.float32)[:1], 5, exclude_keys=["x"])[0]
        assert [h.key for h in hits] == ["y"]
        assert store.search("c", np.eye(3, dtype=np.float32)[:1], 1, filter="label == 2")[0][0].key == "y"


def test_fetch_keys_and_errors(tmp_path: Path) -> None:
    with IndexStore.open(make_cfg(tmp_path, metric="l2")) as store:
        store.create_collection("c", dim=2)
        store.upsert("c", ["b", "a", "c"], np.array([[1, 2], [3, 4], [5, 6]], np.float32), [{"n": "b"}, {}, {}])
        items = store.fetch("c")
        assert items.keys == ["a", "b", "c"]  # all items: sorted by key
        np.testing.assert_array_equal(items.vectors, [[3, 4], [1, 2], [5, 6]])
        assert items.vectors.dtype == np.float32 and items.attributes[1] == {"n": "b"}
        some = store.fetch("c", ["c", "b"])
        assert some.keys == ["c", "b"] and some.vectors.tolist() == [[5, 6], [1, 2]]
        assert store.keys("c") == ["a", "b", "c"]
        with pytest.raises(KeyNotFoundError, match="'zz'") as missing:
            store.fetch("c", ["a", "zz"])
        assert isinstance(missing.value, KeyError) and isinstance(missing.value, EmbedServeError)
        with pytest.raises(CollectionNotFoundError, match="no collection named 'nope'") as unknown:
            store.fetch("nope")
        assert isinstance(unknown.value, KeyError)
        with pytest.raises(InvalidIndexRequestError, match="collection name"):
            store.create_collection("bad/name", dim=2)
        with pytest.raises(CollectionExistsError):
            store.create_collection("c", dim=2)
        assert store.create_collection("c", dim=2, exist_ok=True).count == 3
        with pytest.raises(InvalidIndexRequestError, match="2-d vectors"):
            store.upsert("c", ["d"], np.zeros((1, 3), np.float32))
        with pytest.raises(InvalidIndexRequestError, match="finite"):
            store.upsert("c", ["d"], np.array([[np.nan, 1]], np.float32))
        with pytest.raises(InvalidIndexRequestError, match="non-empty key"):
            store.upsert("c", [""], np.zeros((1, 2), np.float32))
        with pytest.raises(InvalidIndexRequestError, match="filter"):
            store.search("c", np.zeros((1, 2), np.float32), 3, filter="label ==")


def test_cosine_vectors_are_normalised_unless_already_unit(tmp_path: Path) -> None:
    with IndexStore.open(make_cfg(tmp_path)) as store:
        store.create_collection("c", dim=2)
        unit = np.array([[0.6, 0.8]], np.float32)
        store.upsert("c", ["u", "v"], np.concatenate([unit, [[3.0, 4.0]]]).astype(np.float32))
        items = store.fetch("c", ["u", "v"])
        assert items.vectors[0].tobytes() == unit[0].tobytes()  # stored bit for bit as sent
        np.testing.assert_allclose(items.vectors[1], [0.6, 0.8], rtol=1e-6)
        with pytest.raises(InvalidIndexRequestError, match="zero vector"):
            store.upsert("c", ["z"], np.zeros((1, 2), np.float32))


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


def test_a_data_dir_has_one_store(tmp_path: Path) -> None:
    with IndexStore.open(make_cfg(tmp_path)), pytest.raises(DataDirLockedError, match="in use"):
        IndexStore.open(make_cfg(tmp_path))
    IndexStore.open(make_cfg(tmp_path)).close()  # released on close


def test_group_commit_shares_fsyncs_between_concurrent_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a disk with a 20 ms flush, so that writers pile up behind it
        time.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(wal.os, "fsync", slow_fsync)
    syncs: list[int] = []
    cfg = make_cfg(tmp_path)
    store = IndexStore.open(cfg, on_fsync=lambda seconds, records: syncs.append(records))
    store.create_collection("c", dim=4)
    threads, per_thread = 8, 6

    def writer(t: int) -> None:
        for i in range(per_thread):
            store.upsert("c", [f"{t}-{i}"], np.ones((1, 4), np.float32))

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writes = threads * per_thread
    assert sum(syncs) == writes  # every record was covered by an fsync before its upsert returned
    assert len(syncs) <= writes // 2, syncs  # ...but far fewer fsyncs than writes
    assert store.count("c") == writes
    store.close()


def test_filter_grammar() -> None:
    flt = parse_filter("label == DME and patient != '123' or label == \"CNV\"")
    assert flt is not None
    assert flt.matches({"label": "DME"}) and not flt.matches({"label": "DME", "patient": "123"})
    assert flt.matches({"label": "CNV", "patient": "123"}) and not flt.matches({})
    assert parse_filter("  ") is None
    for bad in ("label", "label = x", "label == x y", "== x", "label == x and"):
        with pytest.raises(InvalidIndexRequestError):
            parse_filter(bad)


def test_index_config_loads_from_env_and_validates() -> None:
    from service.errors import ConfigError

    cfg = load_config(env={"EMBEDSERVE_INDEX_TYPE": "hnsw", "EMBEDSERVE_INDEX_FSYNC": "false"})
    assert cfg.index.type == "hnsw" and cfg.index.fsync is False and cfg.index.metric == "cosine"
    for bad in ({"index.type": "lsh"}, {"index.nprobe": 0}, {"index.exact_filter_fraction": 2.0}):
        with pytest.raises(ConfigError, match="index"):
            load_config(env={}, overrides=bad)
