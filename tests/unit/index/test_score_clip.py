"""Cosine scores never leave [-1, 1], although float32 dot products of unit vectors with themselves can."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from service.config import IndexConfig
from service.index.backends import ExactSearcher, FaissExact, TorchExact
from service.index.rows import RowStore
from service.index.search import search_rows

SEARCHERS: dict[str, Callable[[], ExactSearcher]] = {"faiss": FaissExact, "torch": lambda: TorchExact("cpu")}


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_self_matches_score_at_most_one(name: str) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(400, 1280)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    raw = np.einsum("nd,nd->n", vectors, vectors)  # float32, as every searcher computes
    assert (raw > 1.0).any()  # the precondition: unclipped, some self-scores exceed 1
    rows = RowStore(1280)
    rows.upsert([f"k{i}" for i in range(len(vectors))], vectors, [{} for _ in vectors])
    hits = search_rows(rows, vectors, 3, metric="ip", searcher=SEARCHERS[name](), cfg=IndexConfig())
    top = np.array([h[0].score for h in hits])
    assert [h[0].key for h in hits] == [f"k{i}" for i in range(len(vectors))]
    assert top.max() <= 1.0 and np.allclose(top, 1.0, atol=1e-5)
    everything = np.array([n.score for h in hits for n in h])
    assert everything.min() >= -1.0


def test_l2_scores_are_not_clipped() -> None:
    rows = RowStore(2)
    rows.upsert(["a", "b"], np.array([[0, 0], [3, 4]], np.float32), [{}, {}])
    hits = search_rows(rows, np.array([[0, 0]], np.float32), 2, metric="l2", searcher=FaissExact(), cfg=IndexConfig())
    assert [(h.key, h.score) for h in hits[0]] == [("a", 0.0), ("b", 25.0)]
