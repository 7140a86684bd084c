from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClusterAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLUSTER_ALGORITHM_UNSPECIFIED: _ClassVar[ClusterAlgorithm]
    CLUSTER_ALGORITHM_KMEANS: _ClassVar[ClusterAlgorithm]
    CLUSTER_ALGORITHM_DBSCAN: _ClassVar[ClusterAlgorithm]
    CLUSTER_ALGORITHM_HDBSCAN: _ClassVar[ClusterAlgorithm]
    CLUSTER_ALGORITHM_OPTICS: _ClassVar[ClusterAlgorithm]
    CLUSTER_ALGORITHM_KMEDOIDS: _ClassVar[ClusterAlgorithm]

class ProbeClassifier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROBE_CLASSIFIER_UNSPECIFIED: _ClassVar[ProbeClassifier]
    PROBE_CLASSIFIER_LOGREG: _ClassVar[ProbeClassifier]
    PROBE_CLASSIFIER_KNN: _ClassVar[ProbeClassifier]
CLUSTER_ALGORITHM_UNSPECIFIED: ClusterAlgorithm
CLUSTER_ALGORITHM_KMEANS: ClusterAlgorithm
CLUSTER_ALGORITHM_DBSCAN: ClusterAlgorithm
CLUSTER_ALGORITHM_HDBSCAN: ClusterAlgorithm
CLUSTER_ALGORITHM_OPTICS: ClusterAlgorithm
CLUSTER_ALGORITHM_KMEDOIDS: ClusterAlgorithm
PROBE_CLASSIFIER_UNSPECIFIED: ProbeClassifier
PROBE_CLASSIFIER_LOGREG: ProbeClassifier
PROBE_CLASSIFIER_KNN: ProbeClassifier

class ClusterParameters(_message.Message):
    __slots__ = ("k", "k_min", "k_max", "eps", "min_samples", "min_cluster_size", "max_iter", "n_init", "seed", "silhouette_sample", "metric")
    K_FIELD_NUMBER: _ClassVar[int]
    K_MIN_FIELD_NUMBER: _ClassVar[int]
    K_MAX_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_CLUSTER_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITER_FIELD_NUMBER: _ClassVar[int]
    N_INIT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SILHOUETTE_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    k: int
    k_min: int
    k_max: int
    eps: float
    min_samples: int
    min_cluster_size: int
    max_iter: int
    n_init: int
    seed: int
    silhouette_sample: int
    metric: str
    def __init__(self, k: _Optional[int] = ..., k_min: _Optional[int] = ..., k_max: _Optional[int] = ..., eps: _Optional[float] = ..., min_samples: _Optional[int] = ..., min_cluster_size: _Optional[int] = ..., max_iter: _Optional[int] = ..., n_init: _Optional[int] = ..., seed: _Optional[int] = ..., silhouette_sample: _Optional[int] = ..., metric: _Optional[str] = ...) -> None: ...

class ClusterRequest(_message.Message):
    __slots__ = ("collection", "keys", "algorithm", "parameters", "pca_dim", "ground_truth_attribute", "backend", "include_details", "skip_pca")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PCA_DIM_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DETAILS_FIELD_NUMBER: _ClassVar[int]
    SKIP_PCA_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    algorithm: ClusterAlgorithm
    parameters: ClusterParameters
    pca_dim: int
    ground_truth_attribute: str
    backend: str
    include_details: bool
    skip_pca: bool
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., algorithm: _Optional[_Union[ClusterAlgorithm, str]] = ..., parameters: _Optional[_Union[ClusterParameters, _Mapping]] = ..., pca_dim: _Optional[int] = ..., ground_truth_attribute: _Optional[str] = ..., backend: _Optional[str] = ..., include_details: _Optional[bool] = ..., skip_pca: _Optional[bool] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    data: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SweepPoint(_message.Message):
    __slots__ = ("k", "silhouette", "inertia")
    K_FIELD_NUMBER: _ClassVar[int]
    SILHOUETTE_FIELD_NUMBER: _ClassVar[int]
    INERTIA_FIELD_NUMBER: _ClassVar[int]
    k: int
    silhouette: float
    inertia: float
    def __init__(self, k: _Optional[int] = ..., silhouette: _Optional[float] = ..., inertia: _Optional[float] = ...) -> None: ...

class ContingencyTable(_message.Message):
    __slots__ = ("clusters", "classes", "counts")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedScalarFieldContainer[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, clusters: _Optional[_Iterable[int]] = ..., classes: _Optional[_Iterable[str]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ClusterResponse(_message.Message):
    __slots__ = ("keys", "assignments", "noise", "centers", "medoid_keys", "algorithm", "backend", "seconds", "k", "eps", "metrics", "table", "sweep", "k_distance", "projection", "center_distance", "ground_truth", "paths", "warnings")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    CENTERS_FIELD_NUMBER: _ClassVar[int]
    MEDOID_KEYS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    K_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    CENTER_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    assignments: _containers.RepeatedScalarFieldContainer[int]
    noise: _containers.RepeatedScalarFieldContainer[bool]
    centers: Matrix
    medoid_keys: _containers.RepeatedScalarFieldContainer[str]
    algorithm: str
    backend: str
    seconds: float
    k: int
    eps: float
    metrics: _containers.ScalarMap[str, float]
    table: ContingencyTable
    sweep: _containers.RepeatedCompositeFieldContainer[SweepPoint]
    k_distance: _containers.RepeatedScalarFieldContainer[float]
    projection: Matrix
    center_distance: _containers.RepeatedScalarFieldContainer[float]
    ground_truth: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., assignments: _Optional[_Iterable[int]] = ..., noise: _Optional[_Iterable[bool]] = ..., centers: _Optional[_Union[Matrix, _Mapping]] = ..., medoid_keys: _Optional[_Iterable[str]] = ..., algorithm: _Optional[str] = ..., backend: _Optional[str] = ..., seconds: _Optional[float] = ..., k: _Optional[int] = ..., eps: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., table: _Optional[_Union[ContingencyTable, _Mapping]] = ..., sweep: _Optional[_Iterable[_Union[SweepPoint, _Mapping]]] = ..., k_distance: _Optional[_Iterable[float]] = ..., projection: _Optional[_Union[Matrix, _Mapping]] = ..., center_distance: _Optional[_Iterable[float]] = ..., ground_truth: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("collection", "keys", "target_attribute", "group_attribute", "classifier", "folds", "knn_k", "seed")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TARGET_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    KNN_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    target_attribute: str
    group_attribute: str
    classifier: ProbeClassifier
    folds: int
    knn_k: int
    seed: int
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., target_attribute: _Optional[str] = ..., group_attribute: _Optional[str] = ..., classifier: _Optional[_Union[ProbeClassifier, str]] = ..., folds: _Optional[int] = ..., knn_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class ClassScores(_message.Message):
    __slots__ = ("name", "precision", "recall", "f1", "support")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, name: _Optional[str] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("classifier", "folds", "accuracy", "fold_accuracy", "chance", "per_class", "confusion")
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FOLD_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CHANCE_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    classifier: str
    folds: int
    accuracy: float
    fold_accuracy: _containers.RepeatedScalarFieldContainer[float]
    chance: float
    per_class: _containers.RepeatedCompositeFieldContainer[ClassScores]
    confusion: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, classifier: _Optional[str] = ..., folds: _Optional[int] = ..., accuracy: _Optional[float] = ..., fold_accuracy: _Optional[_Iterable[float]] = ..., chance: _Optional[float] = ..., per_class: _Optional[_Iterable[_Union[ClassScores, _Mapping]]] = ..., confusion: _Optional[_Iterable[int]] = ...) -> None: ...

class FilterRequest(_message.Message):
    __slots__ = ("collection", "keys", "example_keys", "cluster_ids", "by_cluster", "cluster", "max_distance", "unwanted_attribute", "unwanted_values", "method")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_IDS_FIELD_NUMBER: _ClassVar[int]
    BY_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    MAX_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    UNWANTED_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    UNWANTED_VALUES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    example_keys: _containers.RepeatedScalarFieldContainer[str]
    cluster_ids: _containers.RepeatedScalarFieldContainer[int]
    by_cluster: bool
    cluster: ClusterRequest
    max_distance: float
    unwanted_attribute: str
    unwanted_values: _containers.RepeatedScalarFieldContainer[str]
    method: str
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., example_keys: _Optional[_Iterable[str]] = ..., cluster_ids: _Optional[_Iterable[int]] = ..., by_cluster: _Optional[bool] = ..., cluster: _Optional[_Union[ClusterRequest, _Mapping]] = ..., max_distance: _Optional[float] = ..., unwanted_attribute: _Optional[str] = ..., unwanted_values: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ...) -> None: ...

class FilterResponse(_message.Message):
    __slots__ = ("remove", "keep", "method", "threshold", "removed_clusters", "precision", "recall", "quality", "reason")
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REMOVED_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    remove: _containers.RepeatedScalarFieldContainer[str]
    keep: _containers.RepeatedScalarFieldContainer[str]
    method: str
    threshold: float
    removed_clusters: _containers.RepeatedScalarFieldContainer[int]
    precision: float
    recall: float
    quality: float
    reason: str
    def __init__(self, remove: _Optional[_Iterable[str]] = ..., keep: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., threshold: _Optional[float] = ..., removed_clusters: _Optional[_Iterable[int]] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., quality: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class OutliersRequest(_message.Message):
    __slots__ = ("collection", "keys", "k", "top")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    k: int
    top: int
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., top: _Optional[int] = ...) -> None: ...

class OutliersResponse(_message.Message):
    __slots__ = ("keys", "kth_distance", "lof", "score", "paths", "k", "n")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    KTH_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    LOF_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    kth_distance: _containers.RepeatedScalarFieldContainer[float]
    lof: _containers.RepeatedScalarFieldContainer[float]
    score: _containers.RepeatedScalarFieldContainer[float]
    paths: _containers.RepeatedScalarFieldContainer[str]
    k: int
    n: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., kth_distance: _Optional[_Iterable[float]] = ..., lof: _Optional[_Iterable[float]] = ..., score: _Optional[_Iterable[float]] = ..., paths: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., n: _Optional[int] = ...) -> None: ...
