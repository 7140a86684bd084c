from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_DTYPE_UNSPECIFIED: _ClassVar[VectorDType]
    VECTOR_DTYPE_FLOAT32: _ClassVar[VectorDType]
    VECTOR_DTYPE_FLOAT16: _ClassVar[VectorDType]
VECTOR_DTYPE_UNSPECIFIED: VectorDType
VECTOR_DTYPE_FLOAT32: VectorDType
VECTOR_DTYPE_FLOAT16: VectorDType

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
    vector_dtype: VectorDType
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., return_vectors: _Optional[bool] = ..., store: _Optional[bool] = ..., collection: _Optional[str] = ..., vector_dtype: _Optional[_Union[VectorDType, str]] = ...) -> None: ...

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
    dtype: VectorDType
    error: ImageStatus
    def __init__(self, key: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[VectorDType, str]] = ..., error: _Optional[_Union[ImageStatus, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("backbone", "embedding_dim", "input_size", "precision", "device", "decode_backend", "resize", "pad", "version")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    embedding_dim: int
    input_size: int
    precision: str
    device: str
    decode_backend: str
    resize: str
    pad: str
    version: str
    def __init__(self, backbone: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., input_size: _Optional[int] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., decode_backend: _Optional[str] = ..., resize: _Optional[str] = ..., pad: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
