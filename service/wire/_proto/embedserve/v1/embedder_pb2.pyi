from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_DTYPE_UNSPECIFIED: _ClassVar[VectorDtype]
    VECTOR_DTYPE_FLOAT32: _ClassVar[VectorDtype]
    VECTOR_DTYPE_FLOAT16: _ClassVar[VectorDtype]
VECTOR_DTYPE_UNSPECIFIED: VectorDtype
VECTOR_DTYPE_FLOAT32: VectorDtype
VECTOR_DTYPE_FLOAT16: VectorDtype

class Image(_message.Message):
    __slots__ = ("key", "data", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    key: str
    data: bytes
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., data: _Optional[bytes] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "return_vectors", "store", "collection", "vector_dtype")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_DTYPE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    return_vectors: bool
    store: bool
    collection: str
    vector_dtype: VectorDtype
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., return_vectors: _Optional[bool] = ..., store: _Optional[bool] = ..., collection: _Optional[str] = ..., vector_dtype: _Optional[_Union[VectorDtype, str]] = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("images", "return_vectors", "store", "collection", "vector_dtype")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_DTYPE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    return_vectors: bool
    store: bool
    collection: str
    vector_dtype: VectorDtype
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., return_vectors: _Optional[bool] = ..., store: _Optional[bool] = ..., collection: _Optional[str] = ..., vector_dtype: _Optional[_Union[VectorDtype, str]] = ...) -> None: ...

class ImageStatus(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("key", "vector", "dim", "dtype", "error")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    key: str
    vector: bytes
    dim: int
    dtype: VectorDtype
    error: ImageStatus
    def __init__(self, key: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[VectorDtype, str]] = ..., error: _Optional[_Union[ImageStatus, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_info",)
    MODEL_INFO_FIELD_NUMBER: _ClassVar[int]
    model_info: ModelInfo
    def __init__(self, model_info: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("backbone", "embedding_dim", "input_size", "precision", "device", "decode_backend", "resize", "pad", "version", "runtime")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    embedding_dim: int
    input_size: int
    precision: str
    device: str
    decode_backend: str
    resize: str
    pad: str
    version: str
    runtime: str
    def __init__(self, backbone: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., input_size: _Optional[int] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., decode_backend: _Optional[str] = ..., resize: _Optional[str] = ..., pad: _Optional[str] = ..., version: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("key", "vector", "image")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    vector: bytes
    image: bytes
    def __init__(self, key: _Optional[str] = ..., vector: _Optional[bytes] = ..., image: _Optional[bytes] = ...) -> None: ...

class NeighborsRequest(_message.Message):
    __slots__ = ("collection", "k", "filter", "queries", "exclude_self")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SELF_FIELD_NUMBER: _ClassVar[int]
    collection: str
    k: int
    filter: str
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    exclude_self: bool
    def __init__(self, collection: _Optional[str] = ..., k: _Optional[int] = ..., filter: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., exclude_self: _Optional[bool] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("key", "score", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    key: str
    score: float
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., score: _Optional[float] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("neighbors", "error")
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    error: ImageStatus
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., error: _Optional[_Union[ImageStatus, _Mapping]] = ...) -> None: ...

class NeighborsResponse(_message.Message):
    __slots__ = ("results", "metric")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    metric: str
    def __init__(self, results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ..., metric: _Optional[str] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("collection", "keys")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("collection", "keys", "page_size", "include_vectors")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    include_vectors: bool
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., include_vectors: _Optional[bool] = ...) -> None: ...

class StoredItem(_message.Message):
    __slots__ = ("key", "vector", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    key: str
    vector: bytes
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., vector: _Optional[bytes] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "dim")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    dim: int
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ..., dim: _Optional[int] = ...) -> None: ...

class GetCollectionInfoRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class GetCollectionInfoResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionInfo
    def __init__(self, collection: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("name", "dim", "metric", "index_type", "count", "trained", "bytes_on_disk", "search_backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    SEARCH_BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    metric: str
    index_type: str
    count: int
    trained: bool
    bytes_on_disk: int
    search_backend: str
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., index_type: _Optional[str] = ..., count: _Optional[int] = ..., trained: _Optional[bool] = ..., bytes_on_disk: _Optional[int] = ..., search_backend: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "dim", "metric", "index_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    metric: str
    index_type: str
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., index_type: _Optional[str] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionInfo
    def __init__(self, collection: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
