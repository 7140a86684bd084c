"""Use cases over stored vectors: cluster, probe and filter. Called by the Clusterer servicer and the CLI.

    analysis = Analysis(index)                       # anything with fetch(collection, keys) -> FetchedItems
    clustering = analysis.cluster(ClusterQuery(collection="oct", params=ClusterParams(k=4)))
    probe = analysis.probe(ProbeQuery(collection="oct", target_attribute="label"))
    kept = analysis.filter(FilterQuery(collection="oct", example_keys=[...]))

The `*_items` functions do the same over items already in hand (the CLI's Parquet files). Everything here blocks:
a server runs it in a worker thread. Bad requests raise `ClusterRequestError` (INVALID_ARGUMENT at the edge),
including the parameter errors of scikit-learn and of the filters, which surface as ValueError / KeyError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from service.analysis import evaluate, filtering, outliers
from service.analysis.cluster import cluster
from service.errors import ClusterRequestError, EmbedServeError, NoIndexError
from service.types import (
    Clustering,
    ClusterParams,
    ClusterQuery,
    FetchedItems,
    FilterQuery,
    FilterResult,
    OutlierQuery,
    OutlierResult,
    ProbeQuery,
    ProbeResult,
)

StopCheck = Callable[[], bool]
"""Returns True once the run should stop (deadline passed, caller gone); checked between steps."""

ResultObserver = Callable[[str, str, float], None]
"""Called with (algorithm, backend, seconds) after each clustering, e.g. to feed a duration histogram."""


class VectorSource(Protocol):
    """Where the vectors come from: `service.index.store.IndexStore`, or any store with the same `fetch`.

    `fetch` raises an EmbedServeError subclass for an unknown collection or key.
    """

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems: ...


def attribute_values(items: FetchedItems, name: str) -> list[str]:
    """Each item's value of attribute `name` ("" where missing); refuses an attribute no item has."""
    values = [a.get(name, "") for a in items.attributes]
    if values and not any(values):
        known = sorted({k for a in items.attributes for k in a})
        raise ClusterRequestError(f"no item has the attribute {name!r}; known: {', '.join(known) or 'none'}")
    return values


def cluster_items(
    items: FetchedItems,
    params: ClusterParams,
    *,
    ground_truth_attribute: str = "",
    include_details: bool = False,
    should_stop: StopCheck | None = None,
) -> Clustering:
    """Cluster `items.vectors`, scored against `ground_truth_attribute` when given; with `include_details`, also
    what a report needs (2-D projection, distance to the centre, ground truth and `path` of every item)."""
    truth = attribute_values(items, ground_truth_attribute) if ground_truth_attribute else None
    try:
        result = cluster(items.vectors, params, truth=truth, should_stop=should_stop)
    except ValueError as e:
        if isinstance(e, EmbedServeError):
            raise
        # A parameter scikit-learn (or another backend) refuses for this data: the caller's to fix.
        raise ClusterRequestError(
            f"the {params.algorithm} parameters do not fit these {len(items.keys)} items: {e}"
        ) from e
    clustering = Clustering(keys=list(items.keys), result=result, truth=truth)
    if include_details:
        clustering.paths = [a.get("path", "") for a in items.attributes]
        clustering.projection = evaluate.projection_2d(result.features, seed=params.seed)
        clustering.center_distance = result.center_distances()
    return clustering


def probe_items(
    items: FetchedItems,
    query: ProbeQuery,
    *,
    groups: Sequence[str] | None = None,
    group_name: str | None = None,
) -> ProbeResult:
    """Cross-validated prediction of `query.target_attribute` from the vectors (`service.analysis.evaluate`).

    Groups come from `query.group_attribute`, or are given (`groups`, named `group_name`) by the caller.
    """
    if not query.target_attribute:
        raise ClusterRequestError("name the target_attribute to predict (e.g. label)")
    truth = attribute_values(items, query.target_attribute)
    if groups is None and query.group_attribute:
        groups, group_name = attribute_values(items, query.group_attribute), query.group_attribute
    try:
        return evaluate.run_probe(
            items.vectors,
            truth,
            classifier=query.classifier,
            folds=query.folds,
            groups=groups,
            group_name=group_name,
            knn_k=query.knn_k,
            seed=query.seed,
        )
    except ValueError as e:
        if isinstance(e, EmbedServeError):
            raise
        raise ClusterRequestError(str(e)) from e


def filter_items(items: FetchedItems, query: FilterQuery, *, should_stop: StopCheck | None = None) -> FilterResult:
    """The items to remove: those near `query.example_keys`, or the members of whole clusters (`by_cluster` /
    `cluster_ids`), scored against the `unwanted_values` of `unwanted_attribute` when given."""
    unwanted = None
    if query.unwanted_attribute:
        values = set(query.unwanted_values)
        marks = attribute_values(items, query.unwanted_attribute)
        unwanted = [k for k, v in zip(items.keys, marks, strict=True) if v in values]
    examples = list(query.example_keys)
    try:
        if query.by_cluster or query.cluster_ids or query.method == "cluster":
            params = query.cluster if query.cluster is not None else ClusterParams()
            labels = cluster(items.vectors, params, should_stop=should_stop).labels
            ids = sorted(set(query.cluster_ids) | set(evaluate.example_clusters(items.keys, labels, examples)))
            if not ids:
                raise ClusterRequestError("no cluster to remove: give cluster_ids or examples that fall in one")
            r = evaluate.filter_by_clusters(items.keys, labels, ids, unwanted=unwanted)
        elif not examples:
            raise ClusterRequestError("give example_keys (or cluster_ids / by_cluster)")
        elif query.method == "auto" and query.max_distance is None:
            r = filtering.auto_filter(items.keys, items.vectors, examples, unwanted=unwanted)
            ids = r.removed_clusters
        else:
            ids = []
            r = evaluate.filter_by_examples(
                items.keys, items.vectors, examples, max_distance=query.max_distance, unwanted=unwanted
            )
    except KeyError as e:
        if isinstance(e, EmbedServeError):
            raise
        raise ClusterRequestError(str(e.args[0]) if e.args else "unknown example key") from e
    except ValueError as e:
        if isinstance(e, EmbedServeError):
            raise
        raise ClusterRequestError(str(e)) from e
    return FilterResult(
        remove=r.remove,
        keep=r.keep,
        method=r.method,
        threshold=r.threshold,
        precision=r.precision,
        recall=r.recall,
        quality=r.quality,
        removed_clusters=ids,
        reason=r.reason,
    )


def outliers_items(items: FetchedItems, query: OutlierQuery) -> OutlierResult:
    """The items ranked most unusual first (`service.analysis.outliers`), with their `path` attributes."""
    try:
        return outliers.rank_outliers(
            items.keys,
            items.vectors,
            k=query.k,
            top=query.top,
            paths=[a.get("path", "") for a in items.attributes],
        )
    except ValueError as e:
        if isinstance(e, EmbedServeError):
            raise
        raise ClusterRequestError(str(e)) from e


class Analysis:
    """Cluster, probe, filter and score outliers in the vectors of a stored collection (or some of its keys)."""

    def __init__(self, source: VectorSource | None, *, observe: ResultObserver | None = None) -> None:
        self.source = source
        self.observe = observe

    def fetch(self, collection: str, keys: Sequence[str] = ()) -> FetchedItems:
        """The items of `collection` (only `keys` when given)."""
        if self.source is None:
            raise NoIndexError("this server has no index: start it with a data directory to store collections")
        if not collection:
            raise ClusterRequestError("name the collection")
        return self.source.fetch(collection, list(keys) or None)

    def cluster(self, query: ClusterQuery, *, should_stop: StopCheck | None = None) -> Clustering:
        """Cluster the collection as `query` says (see `cluster_items`)."""
        items = self.fetch(query.collection, query.keys)
        clustering = cluster_items(
            items,
            query.params,
            ground_truth_attribute=query.ground_truth_attribute,
            include_details=query.include_details,
            should_stop=should_stop,
        )
        if self.observe is not None:
            r = clustering.result
            self.observe(r.algorithm, r.backend, r.seconds)
        return clustering

    def probe(self, query: ProbeQuery) -> ProbeResult:
        """Probe the collection as `query` says (see `probe_items`)."""
        return probe_items(self.fetch(query.collection, query.keys), query)

    def filter(self, query: FilterQuery, *, should_stop: StopCheck | None = None) -> FilterResult:
        """Filter the collection as `query` says (see `filter_items`)."""
        return filter_items(self.fetch(query.collection, query.keys), query, should_stop=should_stop)

    def outliers(self, query: OutlierQuery) -> OutlierResult:
        """Rank the items of the collection by how unusual they are (see `outliers_items`)."""
        return outliers_items(self.fetch(query.collection, query.keys), query)
