"""The index store: exact search against brute-force numpy after upserts and deletes, collections, errors, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.config import load_config
from service.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DataDirLockedError,
    EmbedServeError,
    InvalidIndexRequestError,
    KeyNotFoundError,
)
from service.index.store import IndexStore
from tests.unit.index.reference import DIM, FILTERS, brute_force, check_equal, make_cfg, populate


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


def test_fetch_vectors_and_limits(tmp_path: Path) -> None:
    with IndexStore.open(make_cfg(tmp_path, metric="l2")) as store:
        store.create_collection("c", dim=2)
        store.upsert("c", ["a", "b"], np.array([[1, 2], [3, 4]], np.float32))
        got = store.fetch_vectors("c", ["b", "nope", "a"])
        assert got[1] is None and got[0] is not None and got[2] is not None
        assert got[0].tolist() == [3, 4] and got[2].tolist() == [1, 2]
        assert store.counts() == {"c": 2} and store.has_collection("c") and not store.has_collection("d")
        for k in (0, 10_001):
            with pytest.raises(InvalidIndexRequestError, match="k="):
                store.search("c", np.zeros((1, 2), np.float32), k)
        with pytest.raises(InvalidIndexRequestError, match="exclusions"):
            store.search("c", np.zeros((2, 2), np.float32), 1, exclude_keys=["a"])
        store.drop_collection("c")
        with pytest.raises(CollectionNotFoundError):
            store.fetch_vectors("c", ["a"])


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


def test_a_data_dir_has_one_store(tmp_path: Path) -> None:
    with IndexStore.open(make_cfg(tmp_path)), pytest.raises(DataDirLockedError, match="in use"):
        IndexStore.open(make_cfg(tmp_path))
    IndexStore.open(make_cfg(tmp_path)).close()  # released on close


def test_index_config_loads_from_env_and_validates() -> None:
    from service.errors import ConfigError

    cfg = load_config(env={"EMBEDSERVE_INDEX_TYPE": "hnsw", "EMBEDSERVE_INDEX_FSYNC": "false"})
    assert cfg.index.type == "hnsw" and cfg.index.fsync is False and cfg.index.metric == "cosine"
    for bad in ({"index.type": "lsh"}, {"index.nprobe": 0}, {"index.exact_filter_fraction": 2.0}):
        with pytest.raises(ConfigError, match="index"):
            load_config(env={}, overrides=bad)
