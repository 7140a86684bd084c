"""Search planning over in-memory rows, with no data directory: exact and approximate (re-scored) searches against
numpy brute force, with filters, exclusions and k beyond the number of items."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from service.config import IndexConfig
from service.index.backends import AnnParams, ExactSearcher, FaissExact, SearchMetric, TorchExact, build_ann
from service.index.filter import parse_filter
from service.index.rows import RowStore
from service.index.search import rescore, search_rows
from service.types import Neighbor
from tests.unit.index.reference import FILTER_PREDICATES, FILTERS

DIM = 16
Predicate = Callable[[Mapping[str, str]], bool]


class Items:
    """The rows under test and an independent copy of what they should hold (dicts by key)."""

    def __init__(self, rng: np.random.Generator, n: int, metric: SearchMetric) -> None:
        self.metric = metric
        self.rows = RowStore(DIM)
        self.vectors: dict[str, np.ndarray] = {}
        self.attributes: dict[str, dict[str, str]] = {}
        self.rng = rng
        keys = [f"k{i:04d}" for i in range(n)]
        self.upsert(keys, [{"label": "abcd"[i % 4], "patient": str(i % 13)} for i in range(n)])

    def draw(self, n: int) -> np.ndarray:
        vectors = self.rng.normal(size=(n, DIM)).astype(np.float32)
        if self.metric == "ip":  # cosine collections hold unit vectors
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def upsert(self, keys: list[str], attributes: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.draw(len(keys))
        new_ids = self.rows.upsert(keys, vectors, attributes)
        for key, vector, attrs in zip(keys, vectors, attributes, strict=True):
            self.vectors[key], self.attributes[key] = vector, attrs
        return vectors, new_ids

    def delete(self, keys: list[str]) -> None:
        assert self.rows.delete(keys) == len([k for k in keys if k in self.vectors])
        for key in keys:
            self.vectors.pop(key, None)
            self.attributes.pop(key, None)

    def brute_force(
        self, queries: np.ndarray, k: int, keep: Predicate, exclude: list[str | None] | None = None
    ) -> list[list[tuple[str, float]]]:
        """float64 scores of every live item that `keep` accepts, best first, without `exclude[i]`."""
        out = []
        for i, q in enumerate(queries.astype(np.float64)):
            scored = []
            for key, vector in self.vectors.items():
                if not keep(self.attributes[key]) or (exclude is not None and key == exclude[i]):
                    continue
                v = vector.astype(np.float64)
                scored.append((key, float(q @ v) if self.metric == "ip" else float(((q - v) ** 2).sum())))
            scored.sort(key=lambda pair: -pair[1] if self.metric == "ip" else pair[1])
            out.append(scored[:k])
        return out


def check(got: list[list[Neighbor]], expected: list[list[tuple[str, float]]], items: Items) -> None:
    assert len(got) == len(expected)
    for hits, ref in zip(got, expected, strict=True):
        assert [h.key for h in hits] == [key for key, _ in ref]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in ref], rtol=1e-4, atol=1e-4)
        assert all(h.attributes == items.attributes[h.key] for h in hits)


def exact_rows(rows: RowStore, queries: np.ndarray, k: int, **kwargs: Any) -> list[list[Neighbor]]:
    """`search_rows` with the faiss exact searcher and the default settings."""
    return search_rows(rows, queries, k, searcher=FaissExact(), cfg=IndexConfig(), **kwargs)


SEARCHERS: dict[str, Callable[[], ExactSearcher]] = {"faiss": FaissExact, "torch": lambda: TorchExact("cpu")}


def churned(metric: SearchMetric, n: int = 1500, seed: int = 0) -> Items:
    """n items, then a tenth replaced (new vectors, moved to label d) and another tenth deleted."""
    items = Items(np.random.default_rng(seed), n, metric)
    keys = sorted(items.vectors)
    items.upsert(keys[::10], [{"label": "d", "patient": "7"}] * len(keys[::10]))
    items.delete([*keys[5::10], "never-stored"])
    return items


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("backend", list(SEARCHERS))
def test_exact_search_equals_brute_force(metric: SearchMetric, backend: str) -> None:
    items = churned(metric)
    queries = items.draw(12)
    searcher = SEARCHERS[backend]()
    for text in FILTERS:
        got = search_rows(
            items.rows, queries, 10, metric=metric, searcher=searcher, cfg=IndexConfig(), flt=parse_filter(text)
        )
        check(got, items.brute_force(queries, 10, FILTER_PREDICATES[text]), items)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_k_beyond_the_items_and_exclude_self(metric: SearchMetric) -> None:
    items = Items(np.random.default_rng(3), 9, metric)
    keys = sorted(items.vectors)
    queries = np.stack([items.vectors[k] for k in keys[:4]])  # each query is a stored item
    exclude: list[str | None] = [keys[0], None, keys[2], "not-a-key"]
    got = exact_rows(items.rows, queries, 50, metric=metric)
    check(got, items.brute_force(queries, 50, lambda a: True), items)
    assert all(len(hits) == 9 for hits in got) and [hits[0].key for hits in got] == keys[:4]
    got = exact_rows(items.rows, queries, 3, exclude=exclude, metric=metric)
    check(got, items.brute_force(queries, 3, lambda a: True, exclude), items)
    assert [len(hits) for hits in got] == [3, 3, 3, 3]  # leaving a key out still returns k
    flt = parse_filter("label == b")
    got = exact_rows(items.rows, queries, 50, flt=flt, exclude=exclude, metric=metric)
    check(got, items.brute_force(queries, 50, lambda a: a["label"] == "b", exclude), items)


def test_nothing_to_search() -> None:
    empty = RowStore(DIM)
    queries = np.ones((2, DIM), np.float32)
    assert exact_rows(empty, queries, 5, metric="l2") == [[], []]
    items = Items(np.random.default_rng(4), 20, "l2")
    assert exact_rows(items.rows, queries[:0], 5, metric="l2") == []
    flt = parse_filter("label == nothing")
    assert exact_rows(items.rows, queries, 5, flt=flt, metric="l2") == [[], []]


class Counted:
    """An IVF index that counts its searches (to show that a search went through it)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.searches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)

    def search(self, *args: Any, **kwargs: Any) -> Any:
        self.searches += 1
        return self.index.search(*args, **kwargs)


def _built(items: Items, index_type: str) -> Any:
    params = AnnParams(index_type=index_type, dim=DIM, nlist=8, pq_m=4, pq_nbits=8, hnsw_m=16, ef_construction=80)
    return build_ann(params, items.rows.live_vectors.copy(), items.rows.live_ids.copy())


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_flat_probing_every_list_equals_brute_force(metric: SearchMetric) -> None:
    """With nprobe >= nlist an IVF-Flat search is exhaustive, so its re-scored answer is the exact one; this holds
    through items written after the build (added to the index) and deleted or replaced ones (dead ids)."""
    items = churned(metric, seed=1)
    ann = Counted(_built(items, "ivf_flat"))
    keys = sorted(items.vectors)
    vectors, new_ids = items.upsert([*keys[:40], "new-1", "new-2"], [{"label": "a", "patient": "1"}] * 42)
    ann.add_with_ids(vectors, new_ids)  # as the collection does after a build
    items.delete(keys[100:160])
    assert ann.ntotal > items.rows.count  # dead ids: searches are restricted
    cfg = IndexConfig(nprobe=8, refine_factor=4, exact_filter_fraction=0.0)
    queries = items.draw(10)
    for text in FILTERS[:4]:
        got = search_rows(
            items.rows, queries, 10, metric=metric, searcher=FaissExact(), cfg=cfg, ann=ann, flt=parse_filter(text)
        )
        check(got, items.brute_force(queries, 10, FILTER_PREDICATES[text]), items)
        assert ann.searches > 0, text
        ann.searches = 0


@pytest.mark.parametrize("index_type", ["hnsw", "ivf_pq"])
def test_approximate_hits_match_the_filter_and_carry_exact_scores(index_type: str) -> None:
    items = churned("ip", seed=2)
    ann = _built(items, index_type)
    items.delete(sorted(items.vectors)[:50])
    cfg = IndexConfig(nprobe=8, exact_filter_fraction=0.0)
    queries = items.draw(20)
    for text in FILTERS[:4]:
        keep = FILTER_PREDICATES[text]
        got = search_rows(
            items.rows, queries, 10, metric="ip", searcher=FaissExact(), cfg=cfg, ann=ann, flt=parse_filter(text)
        )
        exact = items.brute_force(queries, 10, keep)
        recalls = []
        for q, hits, ref in zip(queries, got, exact, strict=True):
            assert len(hits) == 10 and all(keep(items.attributes[h.key]) for h in hits)
            scores = [h.score for h in hits]
            np.testing.assert_allclose(scores, [float(q @ items.vectors[h.key]) for h in hits], rtol=1e-5, atol=1e-5)
            assert scores == sorted(scores, reverse=True)
            recalls.append(len({h.key for h in hits} & {key for key, _ in ref}) / 10)
        assert np.mean(recalls) >= 0.8, (text, recalls)


def test_a_selective_filter_is_answered_exactly() -> None:
    """Below `exact_filter_fraction` the approximate index is not consulted (a broken one would show)."""

    class Broken:
        ntotal = 10**6

        def search(self, *args: object, **kwargs: object) -> object:
            raise AssertionError("the approximate index was searched")

    items = churned("l2", seed=3)
    items.upsert(["rare-1", "rare-2", "rare-3"], [{"label": "rare"}] * 3)
    queries = items.draw(4)
    cfg = IndexConfig(exact_filter_fraction=0.05)
    got = search_rows(
        items.rows,
        queries,
        2,
        metric="l2",
        searcher=FaissExact(),
        cfg=cfg,
        ann=Broken(),
        flt=parse_filter("label == rare"),
    )
    check(got, items.brute_force(queries, 2, lambda a: a.get("label") == "rare"), items)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rescore_keeps_the_best_candidates_and_pads(metric: SearchMetric) -> None:
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(30, 5)).astype(np.float32)
    queries = rng.normal(size=(3, 5)).astype(np.float32)
    candidates = np.array([[4, 9, -1, 2], [-1, -1, -1, -1], [29, 0, 7, 11]], dtype=np.int64)
    scores, rows = rescore(vectors, queries, candidates, 6, metric=metric)
    assert scores.shape == rows.shape == (3, 6) and scores.dtype == np.float32 and rows.dtype == np.int64
    for i in range(3):
        valid = [int(c) for c in candidates[i] if c >= 0]
        exact = {
            c: float(queries[i] @ vectors[c]) if metric == "ip" else float(((queries[i] - vectors[c]) ** 2).sum())
            for c in valid
        }
        best = sorted(valid, key=lambda c: -exact[c] if metric == "ip" else exact[c])
        assert rows[i].tolist() == best + [-1] * (6 - len(best))
        np.testing.assert_allclose(scores[i, : len(best)], [exact[c] for c in best], rtol=1e-5)
        assert np.all(scores[i, len(best) :] == (-np.inf if metric == "ip" else np.inf))
