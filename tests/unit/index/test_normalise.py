"""Extreme query and stored vectors: cosine normalises them safely (float64 norms), non-finite norms are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.config import load_config
from service.errors import InvalidIndexRequestError
from service.index.store import IndexStore

DIM = 16


def _store(tmp_path: Path) -> IndexStore:
    store = IndexStore.open(load_config(env={}, overrides={"data_dir": str(tmp_path / "data")}))
    store.create_collection("c", dim=DIM, metric="cosine", index_type="flat")
    store.create_collection("e", dim=DIM, metric="l2", index_type="flat")
    return store


def _reference_cosine(stored: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of `query` to each stored row, in float64 after scaling by the largest component (no overflow)."""
    q = query.astype(np.float64) / np.abs(query).max()
    s = stored.astype(np.float64) / np.abs(stored).max(axis=1, keepdims=True)
    return (s @ q) / (np.linalg.norm(s, axis=1) * np.linalg.norm(q))


@pytest.mark.parametrize("scale", [1e20, 1e-30, 3e38, 1e-44])
def test_extreme_cosine_queries_find_the_same_neighbours_as_unit_ones(tmp_path: Path, scale: float) -> None:
    rng = np.random.default_rng(3)
    stored = rng.normal(size=(40, DIM)).astype(np.float32)
    keys = [f"k{i}" for i in range(40)]
    direction = rng.normal(size=DIM).astype(np.float32)
    query = (direction / np.abs(direction).max() * np.float32(scale)).astype(np.float32)
    assert np.isfinite(query).all() and (query != 0).any()
    with _store(tmp_path) as store:
        store.upsert("c", keys, stored, [{} for _ in keys])
        hits = store.search("c", query[None, :], 5)[0]
    expected = _reference_cosine(stored, query)
    order = np.argsort(-expected)[:5]
    assert [h.key for h in hits] == [keys[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], expected[order], atol=1e-5)


def test_extreme_vectors_are_stored_as_unit_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3, DIM)).astype(np.float32)
    vectors = np.stack([base[0] * np.float32(1e20), base[1] * np.float32(1e-30), base[2]]).astype(np.float32)
    with _store(tmp_path) as store:
        store.upsert("c", ["big", "tiny", "plain"], vectors, [{}, {}, {}])
        got = store.fetch("c", ["big", "tiny", "plain"]).vectors
    want = base.astype(np.float64) / np.linalg.norm(base.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=1e-6)


def test_zero_and_non_finite_vectors_are_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        with pytest.raises(InvalidIndexRequestError, match="zero vector"):
            store.search("c", np.zeros((1, DIM), np.float32), 3)
        for bad in (np.inf, np.nan):
            query = np.ones((1, DIM), np.float32)
            query[0, 3] = bad
            with pytest.raises(InvalidIndexRequestError, match="finite"):
                store.search("c", query, 3)
        # l2 distances of vectors this long overflow float32: refused, not answered with arbitrary neighbours.
        with pytest.raises(InvalidIndexRequestError, match="norm"):
            store.search("e", np.full((1, DIM), 1e20, np.float32), 3)
