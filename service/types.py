"""Records shared across layers: model info, per-image outcomes, index results, clustering, probe and filter
requests and results.

Torch-free on purpose: the client, the wire conversions and the CLI import these without loading torch,
PIL or faiss (numpy only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar, get_args

import numpy as np

from service.errors import ConfigError, ImageError


@dataclass(frozen=True, slots=True)
class Neighbor:
    """One search result: the item's key, its score (cosine: similarity, higher is closer; l2: squared distance,
    lower is closer) and its attributes."""

    key: str
    score: float
    attributes: dict[str, str]


@dataclass(frozen=True, slots=True)
class FetchedItems:
    """Stored items: keys, their vectors (float32, (n, dim), as stored) and attributes, row for row."""

    keys: list[str]
    vectors: np.ndarray
    attributes: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """What `GetCollectionInfo` reports about a collection."""

    name: str
    dim: int
    metric: str
    """`cosine` or `l2`."""
    index_type: str
    """`flat`, `ivf_flat`, `ivf_pq` or `hnsw`."""
    count: int
    trained: bool
    """True when searches use the configured index: always for `flat`; for the others once it is built."""
    bytes_on_disk: int
    search_backend: str
    """`faiss-cpu`, `faiss-gpu`, `torch-cuda`, `torch-cpu` (exact search), or the approximate index in use."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine runs, for `GetModelInfo` and for the metadata of written files."""

    backbone: str
    embedding_dim: int
    input_size: int
    precision: str
    device: str
    decode_backend: str
    resize: str
    pad: str
    version: str
    runtime: str = ""
    """The backbone runtime: `torch`, `openvino`, `onnxruntime` (empty from servers that predate it)."""


@dataclass(slots=True)
class EmbedOutcome:
    """The result for one image: a unit-norm float32 vector, or the error that image alone hit."""

    vector: np.ndarray | None = None
    error: ImageError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Loadable(Protocol):
    """An input of `embed_iter`: `load()` returns the encoded bytes or raises `ImageError` (e.g. unreadable file)."""

    def load(self) -> bytes: ...


ItemT = TypeVar("ItemT", bound=Loadable)


def load_item(item: Loadable) -> bytes | ImageError:
    """`item.load()`, or the `ImageError` it raised."""
    try:
        return item.load()
    except ImageError as e:
        return e


@dataclass(slots=True)
class Embedded(Generic[ItemT]):
    """An input item paired with its outcome, as `embed_iter` yields them."""

    item: ItemT
    outcome: EmbedOutcome


# -- embedding requests and results --------------------------------------------------------------------------------

VectorDType = Literal["float32", "float16"]
"""How vectors travel on the wire: little-endian float32 (default) or float16 (half the bytes)."""


@dataclass(frozen=True, slots=True)
class ImageData:
    """One encoded image to embed: the caller's key, the file's bytes and attributes to store with its vector."""

    key: str
    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedBatch:
    """What one `Embed` call asks for: images, the vector encoding, and whether to store them (and where)."""

    images: list[ImageData]
    dtype: VectorDType = "float32"
    return_vectors: bool = True
    store: bool = False
    collection: str = ""
    """The collection for `store` ("" = the server's default)."""


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One image's result: a unit-norm float32 vector (None when not requested), or its error."""

    key: str
    vector: np.ndarray | None
    error: ImageError | None

    @property
    def ok(self) -> bool:
        return self.error is None


# -- neighbour queries ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryError:
    """Why one neighbour query failed alone: a google.rpc code, a reason tag (`key_not_found`, `invalid_image`, ...)
    and a message."""

    code: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class NeighborQuery:
    """One query of `neighbors`: exactly one of a stored `key`, a `vector` or encoded `image` bytes."""

    key: str | None = None
    vector: np.ndarray | None = None
    image: bytes | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.key, self.vector, self.image))
        if given != 1:
            raise ValueError("a NeighborQuery takes exactly one of key, vector or image")


@dataclass(frozen=True, slots=True)
class QueryNeighbors:
    """The result of one query: its neighbours, best first, or the error it failed with."""

    neighbors: list[Neighbor]
    error: QueryError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighborsSearch:
    """What one `Neighbors` call asks for: queries, neighbours per query, the collection and an attribute filter."""

    queries: list[NeighborQuery]
    k: int = 10
    collection: str = ""
    """"" = the server's default collection."""
    filter: str = ""
    """An attribute filter such as `label == DME` ("" = none)."""
    exclude_self: bool = False
    """For key queries: leave the query's own item out of its results."""


# -- clustering ---------------------------------------------------------------------------------------------------

NOISE = -1
"""The cluster id of points a density algorithm leaves unassigned."""

Algorithm = Literal["kmeans", "dbscan", "hdbscan", "optics", "kmedoids"]
BackendName = Literal["auto", "cuml", "torch", "faiss", "sklearn", "kmedoids"]
Classifier = Literal["logreg", "knn"]
DensityMetric = Literal["cosine", "euclidean"]
FilterMethod = Literal["auto", "distance", "cluster"]

PARAMETER_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "k": ("kmeans", "kmedoids"),
    "n_init": ("kmeans",),
    "eps": ("dbscan",),
    "min_samples": ("dbscan", "hdbscan", "optics"),
    "min_cluster_size": ("hdbscan", "optics"),
    "metric": ("dbscan", "hdbscan", "optics"),
}
"""The algorithms each optional ClusterParams field applies to; setting it for another algorithm is an error."""

ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
BACKENDS: dict[str, tuple[str, ...]] = {
    "kmeans": ("cuml", "torch", "faiss", "sklearn"),
    "dbscan": ("cuml", "torch", "sklearn"),
    "hdbscan": ("cuml", "sklearn"),
    "optics": ("sklearn",),
    "kmedoids": ("kmedoids",),
}
"""The backends of each algorithm, in the order `auto` tries them."""


@dataclass(frozen=True, kw_only=True)
class ClusterParams:
    """What to run and how; validated on construction (ConfigError says how to fix a bad value)."""

    algorithm: Algorithm = "kmeans"
    """kmeans | dbscan | hdbscan | optics | kmedoids."""
    backend: BackendName = "auto"
    """Where to run; `auto` takes the first available of `BACKENDS[algorithm]`."""
    k: int | None = None
    """Clusters for kmeans/kmedoids; None sweeps k_min..k_max and picks the best silhouette."""
    k_min: int = 2
    """Smallest k of the sweep."""
    k_max: int = 10
    """Largest k of the sweep (capped at n - 1)."""
    eps: float | None = None
    """DBSCAN radius (in `metric` distance); None takes a robust knee of the k-distance curve."""
    min_samples: int | None = None
    """DBSCAN/HDBSCAN/OPTICS: neighbours (the point included) that make a core point; None: max(3, round(ln n))."""
    min_cluster_size: int | None = None
    """HDBSCAN/OPTICS: the smallest group that counts as a cluster; None: max(min_samples, round(sqrt(n) / 2))."""
    max_iter: int = 100
    """K-means/K-medoids iterations per run."""
    n_init: int | None = None
    """K-means restarts (the lowest inertia wins); None: 4."""
    seed: int = 0
    """Seeds initialisation and sampling: same seed, same backend, same result."""
    pca_dim: int | None = None
    """Project onto this many principal components first; None: automatic (density algorithms when d > n), 0: never."""
    metric: DensityMetric | None = None
    """DBSCAN/HDBSCAN/OPTICS distance: cosine (euclidean between L2-normalised rows, sqrt(2 - 2 cos)) or euclidean;
    None: cosine."""
    silhouette_sample: int = 5000
    """Silhouettes use a random sample of this many points when there are more."""
    curves: bool = False
    """Also compute the silhouette-vs-k sweep and the k-distance curve when the algorithm does not need them."""

    def __post_init__(self) -> None:
        if self.algorithm not in BACKENDS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if self.backend != "auto" and self.backend not in BACKENDS[self.algorithm]:
            raise ConfigError(
                f"backend {self.backend!r} has no {self.algorithm}; use auto or one of "
                f"{', '.join(BACKENDS[self.algorithm])}"
            )
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k must be >= 1 (or unset for a sweep), got {self.k}")
        if not 2 <= self.k_min <= self.k_max:
            raise ConfigError(f"the k sweep needs 2 <= k_min <= k_max, got {self.k_min}..{self.k_max}")
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"eps must be a positive number (or unset for auto), got {self.eps}")
        for name in ("min_samples", "max_iter", "n_init", "silhouette_sample"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.min_cluster_size is not None and self.min_cluster_size < 2:
            raise ConfigError(f"min_cluster_size must be >= 2, got {self.min_cluster_size}")
        if self.pca_dim is not None and self.pca_dim < 0:
            raise ConfigError(f"pca_dim must be >= 1, 0 for no PCA, or unset for automatic, got {self.pca_dim}")
        if self.metric is not None and self.metric not in get_args(DensityMetric):
            raise ConfigError(f"unknown metric {self.metric!r}; use cosine or euclidean")
        for name, algorithms in PARAMETER_ALGORITHMS.items():
            if getattr(self, name) is not None and self.algorithm not in algorithms:
                raise ConfigError(
                    f"{name} does not apply to {self.algorithm} (only to {', '.join(algorithms)}): leave it unset, "
                    f"or choose one of those algorithms"
                )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One k of a K-means/K-medoids sweep: its silhouette (NaN when undefined) and inertia."""

    k: int
    silhouette: float
    inertia: float


@dataclass(frozen=True, slots=True)
class Contingency:
    """The cluster-by-class table: `counts[i, j]` items of cluster `clusters[i]` have class `classes[j]`."""

    clusters: list[int]
    classes: list[str]
    counts: np.ndarray

    def format(self) -> str:
        """The table as aligned text, one row per cluster, with a total column."""
        head = ["cluster", *self.classes, "total"]
        rows = [
            [("noise" if c == NOISE else str(c)), *(str(int(v)) for v in row), str(int(row.sum()))]
            for c, row in zip(self.clusters, self.counts, strict=True)
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [head, *rows]]
        return "\n".join(lines)


@dataclass(kw_only=True)
class ClusterResult:
    """The same structure from every backend.

    `labels`: int64 (n,), clusters 0..n_clusters-1, noise -1. `centers`: float32 (n_clusters, d) in the space
    that was clustered (after PCA) for kmeans (centroids) and kmedoids (medoids), else None. `medoids`: item
    indices of the medoids (kmedoids) or None. `noise`: bool (n,). `metrics`: see `service.analysis.evaluate`
    (silhouette, n_clusters, noise_fraction, ... and, with a ground truth, accuracy, nmi, ari, purity; inertia
    for kmeans/kmedoids). `sweep`: the silhouette-vs-k curve; `k_distance`: the sorted distances of every
    point to its `min_samples`-th neighbour (the point itself counted first); `eps`: the radius DBSCAN used.
    `features`: the vectors that were clustered (after PCA); empty (0, 0) in a result that came over the wire.
    """

    algorithm: str
    backend: str
    labels: np.ndarray
    noise: np.ndarray
    centers: np.ndarray | None
    medoids: np.ndarray | None
    seconds: float
    metrics: dict[str, float]
    params: ClusterParams
    k: int | None = None
    eps: float | None = None
    sweep: list[SweepPoint] = field(default_factory=list)
    k_distance: np.ndarray | None = None
    table: Contingency | None = None
    features: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))
    warnings: list[str] = field(default_factory=list)
    """Why the result looks degenerate (one cluster, mostly noise), each with the parameter to move."""

    @property
    def n_clusters(self) -> int:
        return len(set(self.labels.tolist()) - {NOISE})

    def center_distances(self) -> np.ndarray:
        """Euclidean distance of every item to the centre of its cluster (the centroid/medoid, else the member
        mean); NaN for noise."""
        out = np.full(self.labels.shape[0], np.nan, dtype=np.float32)
        for c in range(self.n_clusters):
            members = self.labels == c
            if not members.any():
                continue
            center = self.centers[c] if self.centers is not None else self.features[members].mean(axis=0)
            out[members] = np.linalg.norm(self.features[members] - center, axis=1)
        return out


@dataclass(kw_only=True)
class Clustering:
    """A clustering of named items, as the Cluster RPC carries it: the keys, the result (parallel to `keys`) and,
    when details were asked for, what a report needs: the 2-D projection (n, 2), each item's distance to its
    cluster centre, the ground-truth value and the `path` attribute of each item."""

    keys: list[str]
    result: ClusterResult
    truth: list[str] | None = None
    paths: list[str] | None = None
    projection: np.ndarray | None = None
    center_distance: np.ndarray | None = None

    @property
    def medoid_keys(self) -> list[str]:
        """The keys of the medoids (kmedoids), in cluster order; empty otherwise."""
        if self.result.medoids is None:
            return []
        return [self.keys[i] for i in self.result.medoids.tolist()]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterQuery:
    """What one Cluster call asks for: a collection (or some of its keys), the parameters, an attribute to score
    against, and whether to send the details a report needs (which also turns on `params.curves`)."""

    collection: str
    params: ClusterParams = field(default_factory=ClusterParams)
    keys: list[str] = field(default_factory=list)
    """Only these keys; empty means every item."""
    ground_truth_attribute: str = ""
    include_details: bool = False


# -- probes and filtering ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassReport:
    """Precision, recall and F1 of one class over all cross-validation folds, and how many items it has."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Out-of-fold predictions of a classifier on embeddings: accuracy, per-class scores, confusion matrix.

    `confusion[i, j]` counts items of class `classes[i]` predicted as `classes[j]`. `fold_accuracy` holds each
    fold's accuracy; `chance` is the accuracy of always predicting the most frequent class. `predictions` is empty
    in a result that came over the wire.
    """

    classifier: str
    folds: int
    grouped_by: str | None
    accuracy: float
    fold_accuracy: list[float]
    chance: float
    classes: list[str]
    per_class: list[ClassReport]
    confusion: np.ndarray
    predictions: list[str] = field(repr=False)

    def format(self) -> str:
        """A short text report: accuracy, per-class scores and the confusion matrix."""
        group = f", grouped by {self.grouped_by}" if self.grouped_by else ""
        std = float(np.std(self.fold_accuracy)) if self.fold_accuracy else 0.0
        lines = [
            f"{self.classifier}: accuracy {self.accuracy:.3f} (± {std:.3f} over {self.folds} folds{group}); "
            f"chance {self.chance:.3f}",
            f"{'class':>12}  precision  recall     f1  support",
        ]
        lines += [
            f"{c.name:>12}  {c.precision:9.3f}  {c.recall:6.3f}  {c.f1:5.3f}  {c.support:7d}" for c in self.per_class
        ]
        width = max(6, *(len(c) for c in self.classes))
        lines.append("confusion (rows true, columns predicted):")
        lines.append(" " * width + "  " + "  ".join(c.rjust(width) for c in self.classes))
        for name, row in zip(self.classes, self.confusion, strict=True):
            lines.append(name.rjust(width) + "  " + "  ".join(str(int(v)).rjust(width) for v in row))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeQuery:
    """What one Probe call asks for: predict `target_attribute` from the vectors of a collection (or some keys)."""

    collection: str
    target_attribute: str
    keys: list[str] = field(default_factory=list)
    group_attribute: str = ""
    """Keep each value of this attribute on one side of every split ("" = no groups)."""
    classifier: Classifier = "logreg"
    folds: int = 5
    knn_k: int = 5
    seed: int = 0


@dataclass(frozen=True, slots=True)
class FilterResult:
    """Keys to remove and to keep; with the truly unwanted keys known, how good the removal is.

    `quality` is 0.3·precision + 0.7·recall (missing an unwanted image costs more than dropping a good one).
    `threshold` is the distance used by example-distance filtering; `removed_clusters` the clusters removed by
    cluster filtering.
    """

    remove: list[str]
    keep: list[str]
    method: str
    threshold: float | None = None
    precision: float | None = None
    recall: float | None = None
    quality: float | None = None
    removed_clusters: list[int] = field(default_factory=list)
    reason: str = ""
    """Why this method and threshold were chosen (automatic filtering), for the user to check."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterQuery:
    """What one Filter call asks for: remove items near `example_keys`, or whole clusters (`by_cluster`, with the
    clusters of the examples plus `cluster_ids`, of a clustering with `cluster` params); score the removal against
    the items whose `unwanted_attribute` is one of `unwanted_values` when given."""

    collection: str
    keys: list[str] = field(default_factory=list)
    example_keys: list[str] = field(default_factory=list)
    cluster_ids: list[int] = field(default_factory=list)
    by_cluster: bool = False
    cluster: ClusterParams | None = None
    """The clustering behind `cluster_ids` / `by_cluster` (None: `ClusterParams()`)."""
    max_distance: float | None = None
    """Distance filtering radius; None: the examples' own spread (method distance) or the gap (auto)."""
    method: FilterMethod = "auto"
    """auto (chosen from the data, see `service.analysis.filtering`), distance or cluster."""
    unwanted_attribute: str = ""
    unwanted_values: list[str] = field(default_factory=list)


# -- outliers ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierQuery:
    """What one Outliers call asks for: score every item (of `keys`, or of the whole collection) by how far it lies
    from the others; `k` neighbours (None: max(5, round(ln n)))."""

    collection: str
    keys: list[str] = field(default_factory=list)
    k: int | None = None
    """Neighbours for the k-th-neighbour distance and LOF; None: max(5, round(ln n)), at most n - 1."""
    top: int = 0
    """Only the `top` highest-ranked items in the answer; 0: all."""

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k must be >= 1 (or unset for automatic), got {self.k}")
        if self.top < 0:
            raise ConfigError(f"top must be >= 0 (0: all), got {self.top}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierResult:
    """Items ranked most unusual first: `keys[i]` has cosine distance `kth_distance[i]` to its k-th neighbour and
    local outlier factor `lof[i]` (about 1 inside a cluster, larger for outliers); `score` is the rank used (the
    mean of the two ranks, as a fraction: 1 is the most unusual); `paths` when the items have a `path`."""

    keys: list[str]
    kth_distance: np.ndarray
    lof: np.ndarray
    score: np.ndarray
    k: int
    n: int
    paths: list[str] | None = None
