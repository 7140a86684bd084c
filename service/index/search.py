"""Search planning over a collection's rows: exact top-k, or an approximate index's candidates re-scored exactly.

    hits = search_rows(rows, queries, 10, metric="ip", searcher=FaissExact(), cfg=IndexConfig(), flt=parse_filter(...))

Everything here works on in-memory rows (`service.index.rows.RowStore`) and needs no data directory. The plan, per
call: apply the filter to the attributes; search exactly when there is no approximate index, when the filter keeps
fewer than `exact_filter_fraction` of the items or too few for `k * refine_factor` candidates; otherwise fetch
candidates from the approximate index (an id selector restricts IVF searches, HNSW ones are over-fetched and
post-filtered), re-score them exactly, and answer exactly any query whose candidates came back short. With
exclusions one more neighbour is fetched per query, so that leaving the query's own key out still leaves k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.config import IndexConfig
from service.index.backends import ExactSearcher, SearchMetric, ann_search, filters_by_selector
from service.index.filter import Filter
from service.index.rows import RowStore
from service.types import Neighbor

MAX_CANDIDATES = 4096
"""Most candidates one approximate search fetches per query (beyond, the filter is too selective: search exactly)."""


def search_rows(
    rows: RowStore,
    queries: np.ndarray,
    k: int,
    *,
    metric: SearchMetric,
    searcher: ExactSearcher,
    cfg: IndexConfig,
    ann: Any = None,
    flt: Filter | None = None,
    exclude: Sequence[str | None] | None = None,
    cache_key: str = "",
) -> list[list[Neighbor]]:
    """The k best rows for each of `queries` (float32, prepared for the metric), best first, among those matching
    `flt`, leaving `exclude[i]` out of query i's results. Fewer than k where fewer items match.

    `ann` is the collection's approximate index (None: exact only); `cache_key` names the rows for searchers that
    keep a device copy of them.
    """
    extra = 1 if exclude is not None and any(e is not None for e in exclude) else 0
    kk = k + extra
    n = rows.count
    if n == 0 or len(queries) == 0:
        return [[] for _ in range(len(queries))]
    mask = flt.mask(rows.attributes) if flt is not None else None
    allowed = n if mask is None else int(mask.sum())
    if allowed == 0:
        return [[] for _ in range(len(queries))]
    subset = None if mask is None else np.flatnonzero(mask)
    use_ann = ann is not None and allowed >= cfg.exact_filter_fraction * n and allowed > kk * cfg.refine_factor
    if use_ann:
        scores, found = ann_rescored(rows, ann, queries, kk, metric=metric, cfg=cfg, subset=subset)
        short = (found[:, : min(kk, allowed)] < 0).any(axis=1)
        if short.any():
            scores[short], found[short] = exact(
                rows, queries[short], kk, metric=metric, searcher=searcher, subset=subset, cache_key=cache_key
            )
    else:
        scores, found = exact(rows, queries, kk, metric=metric, searcher=searcher, subset=subset, cache_key=cache_key)
    if metric == "ip":  # unit vectors: a cosine; float32 rounding can put a self-match at 1.0000002
        scores = np.clip(scores, -1.0, 1.0)
    results: list[list[Neighbor]] = []
    for i in range(len(queries)):
        skip = exclude[i] if exclude is not None else None
        hits: list[Neighbor] = []
        for score, row in zip(scores[i].tolist(), found[i].tolist(), strict=True):
            if row < 0 or len(hits) == k:
                break
            key = rows.keys[row]
            if key == skip:
                continue
            hits.append(Neighbor(key=key, score=float(score), attributes=dict(rows.attributes[row])))
        results.append(hits)
    return results


def exact(
    rows: RowStore,
    queries: np.ndarray,
    k: int,
    *,
    metric: SearchMetric,
    searcher: ExactSearcher,
    subset: np.ndarray | None = None,
    cache_key: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the exact top-k among `subset` rows (all when None), -1 rows where fewer exist."""
    return searcher.search(
        rows.live_vectors,
        queries,
        k,
        metric=metric,
        rows=subset,
        cache_key=cache_key,
        version=rows.version,
    )


def ann_rescored(
    rows: RowStore,
    ann: Any,
    queries: np.ndarray,
    k: int,
    *,
    metric: SearchMetric,
    cfg: IndexConfig,
    subset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from the approximate index, re-scored exactly; (scores, rows) with -1 where short."""
    n = rows.count
    candidates = k * cfg.refine_factor
    total = max(int(ann.ntotal), 1)
    restricted = subset is not None or total != n  # a filter, or dead ids (deleted or replaced) in the index
    allowed_ids = None
    kept = n if subset is None else len(subset)
    widen = total / max(kept, 1)
    if restricted and filters_by_selector(ann):
        allowed_ids = rows.live_ids if subset is None else rows.ids[subset]
    elif restricted:
        # Over-fetch in proportion to what the filter keeps, then drop the rest below.
        candidates = min(math.ceil(candidates * widen), MAX_CANDIDATES)
    _, found_ids = ann_search(
        ann,
        queries,
        candidates,
        allowed_ids=allowed_ids,
        id_space=rows.next_id,
        nprobe=cfg.nprobe,
        ef_search=cfg.ef_search,
        widen=widen,
    )
    cand_rows = rows.rows_of_ids(found_ids)
    if subset is not None:
        allowed_rows = np.zeros(n + 1, dtype=bool)
        allowed_rows[subset] = True
        cand_rows[~allowed_rows[cand_rows]] = -1  # index -1 maps to the last slot, which is False
    return rescore(rows.vectors, queries, cand_rows, k, metric=metric)


def rescore(
    vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, *, metric: SearchMetric
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's `candidates` (rows of `vectors`, -1 = none) by exact score: (scores float32,
    rows int64), both (n_q, k), padded with -1 rows and the worst score."""
    gathered = vectors[np.maximum(candidates, 0)]  # (q, c, d)
    if metric == "ip":
        scores = np.einsum("qcd,qd->qc", gathered, queries)
        scores[candidates < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        diff = gathered - queries[:, None, :]
        scores = np.einsum("qcd,qcd->qc", diff, diff)
        scores[candidates < 0] = np.inf
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    best_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    best = np.take_along_axis(candidates, order, axis=1)
    if best.shape[1] < k:
        pad = k - best.shape[1]
        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-1)
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf if metric == "ip" else np.inf)
    return best_scores, best
