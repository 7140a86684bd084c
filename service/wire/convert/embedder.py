"""Conversions of `embedserve.v1.EmbedderService` messages: per-image statuses, Embed and EmbedStream, model and
collection info, items and Neighbors. See `service.wire.convert` for the naming rules.

Embed and EmbedStream have their own request and response messages with the same fields; the functions that read
one read the other too."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np

from service.errors import (
    ImageError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidRequestError,
    UnreadableImageError,
    UnsupportedImageError,
)
from service.types import (
    CollectionInfo,
    EmbedBatch,
    EmbedOutcome,
    EmbedResult,
    FetchedItems,
    ImageData,
    ModelInfo,
    Neighbor,
    NeighborQuery,
    NeighborsSearch,
    QueryError,
    QueryNeighbors,
    VectorDType,
)
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb

# google.rpc.Code values (the numbers of grpc.StatusCode), for per-image and per-query statuses.
INVALID_ARGUMENT = 3
NOT_FOUND = 5

DEFAULT_K = 10
"""Neighbours per query when a request says 0."""

DTYPES: dict[int, str] = {
    pb.VECTOR_DTYPE_UNSPECIFIED: "<f4",
    pb.VECTOR_DTYPE_FLOAT32: "<f4",
    pb.VECTOR_DTYPE_FLOAT16: "<f2",
}
"""The numpy dtype of each `VectorDtype` on the wire (UNSPECIFIED is float32)."""
_DTYPE_ENUMS: dict[str, int] = {"float32": pb.VECTOR_DTYPE_FLOAT32, "float16": pb.VECTOR_DTYPE_FLOAT16}
_DTYPE_NAMES: dict[str, VectorDType] = {"<f4": "float32", "<f2": "float16"}


IMAGE_ERRORS: dict[str, type[ImageError]] = {
    cls.reason: cls for cls in (InvalidImageError, UnsupportedImageError, ImageTooLargeError, UnreadableImageError)
}
"""The `ImageError` subclass of each reason tag."""


# -- per-image statuses -----------------------------------------------------------------------------------------


def image_status(error: ImageError) -> tuple[int, str, str]:
    """(google.rpc code, reason tag, message) of one failed image, for `Result.error`."""
    return INVALID_ARGUMENT, error.reason, error.message


def image_error_from_status(code: int, reason: str, message: str) -> ImageError:
    """Rebuild the `ImageError` subclass a server reported for one image (client side)."""
    cls = IMAGE_ERRORS.get(reason)
    if cls is not None:
        return cls(message)
    error = ImageError(message or f"image failed with code {code}")
    error.reason = reason or "invalid_image"
    return error


def _set_status(target: pb.ImageStatus, code: int, reason: str, message: str) -> None:
    target.code, target.reason, target.message = code, reason, message


# -- Embed ------------------------------------------------------------------------------------------------------


def vector_dtype(enum: int) -> VectorDType:
    """The name of a wire `VectorDtype` (UNSPECIFIED is float32); InvalidRequestError for an unknown value."""
    wire = DTYPES.get(enum)
    if wire is None:
        names = ", ".join(pb.VectorDtype.Name(value) for value in DTYPES)
        raise InvalidRequestError(f"unknown vector_dtype {enum}; use one of {names} (UNSPECIFIED means float32)")
    return _DTYPE_NAMES[wire]


def image_to_proto(image: ImageData) -> pb.Image:
    return pb.Image(key=image.key, data=image.data, attributes=image.attributes)


def _embed_request_fields(batch: EmbedBatch) -> dict[str, Any]:
    return {
        "images": [image_to_proto(image) for image in batch.images],
        "return_vectors": batch.return_vectors,
        "vector_dtype": _DTYPE_ENUMS[batch.dtype],
        "store": batch.store,
        "collection": batch.collection,
    }


def embed_batch_to_proto(batch: EmbedBatch) -> pb.EmbedRequest:
    """The `EmbedRequest` of a batch."""
    return pb.EmbedRequest(**_embed_request_fields(batch))


def embed_batch_to_stream_proto(batch: EmbedBatch) -> pb.EmbedStreamRequest:
    """The `EmbedStreamRequest` of a batch (one request of an EmbedStream)."""
    return pb.EmbedStreamRequest(**_embed_request_fields(batch))


def embed_batch_from_proto(request: pb.EmbedRequest | pb.EmbedStreamRequest) -> EmbedBatch:
    """The batch an `EmbedRequest` or `EmbedStreamRequest` asks for (`return_vectors` unset means true)."""
    return EmbedBatch(
        images=[ImageData(image.key, image.data, dict(image.attributes)) for image in request.images],
        dtype=vector_dtype(request.vector_dtype),
        return_vectors=request.return_vectors if request.HasField("return_vectors") else True,
        store=request.store,
        collection=request.collection,
    )


def _add_results(
    response: pb.EmbedResponse | pb.EmbedStreamResponse, batch: EmbedBatch, outcomes: Sequence[EmbedOutcome], dim: int
) -> None:
    wire = "<f2" if batch.dtype == "float16" else "<f4"
    dtype = cast(Any, _DTYPE_ENUMS[batch.dtype])
    for image, outcome in zip(batch.images, outcomes, strict=True):
        result = response.results.add(key=image.key, dim=dim, dtype=dtype)
        if outcome.error is not None:
            _set_status(result.error, *image_status(outcome.error))
        elif batch.return_vectors and outcome.vector is not None:
            result.vector = np.asarray(outcome.vector).astype(wire).tobytes()


def embed_response_to_proto(batch: EmbedBatch, outcomes: Sequence[EmbedOutcome], dim: int) -> pb.EmbedResponse:
    """One `Result` per image of `batch`, in order: its vector in the batch's dtype (when asked for) or its error."""
    response = pb.EmbedResponse()
    _add_results(response, batch, outcomes, dim)
    return response


def embed_stream_response_to_proto(
    batch: EmbedBatch, outcomes: Sequence[EmbedOutcome], dim: int
) -> pb.EmbedStreamResponse:
    """The `EmbedStreamResponse` of one stream request: the `Result`s of `embed_response_to_proto`."""
    response = pb.EmbedStreamResponse()
    _add_results(response, batch, outcomes, dim)
    return response


def embed_results_from_proto(response: pb.EmbedResponse | pb.EmbedStreamResponse) -> list[EmbedResult]:
    """`EmbedResult`s of a response, vectors decoded to float32; InvalidRequestError for a vector whose length does
    not match its `dim`."""
    results: list[EmbedResult] = []
    for r in response.results:
        if r.HasField("error"):
            error = image_error_from_status(r.error.code, r.error.reason, r.error.message)
            results.append(EmbedResult(r.key, None, error))
            continue
        vector = None
        if r.vector:
            wire = DTYPES.get(r.dtype, "<f4")
            if len(r.vector) != r.dim * np.dtype(wire).itemsize:
                raise InvalidRequestError(f"vector of {r.key!r} has {len(r.vector)} bytes, not {r.dim} {wire} values")
            vector = np.frombuffer(r.vector, dtype=wire).astype(np.float32)
        results.append(EmbedResult(r.key, vector, None))
    return results


# -- model and collections --------------------------------------------------------------------------------------


def _same_fields(record_type: type, source: Any) -> dict[str, Any]:
    """`source`'s values of every field of the dataclass `record_type` (record and message name them alike)."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(record_type)}


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**_same_fields(ModelInfo, info))


def model_info_from_proto(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(**_same_fields(ModelInfo, info))


def collection_info_to_proto(info: CollectionInfo) -> pb.CollectionInfo:
    return pb.CollectionInfo(**_same_fields(CollectionInfo, info))


def collection_info_from_proto(info: pb.CollectionInfo) -> CollectionInfo:
    return CollectionInfo(**_same_fields(CollectionInfo, info))


def items_pages_to_proto(
    items: FetchedItems, *, page_size: int, include_vectors: bool
) -> Iterator[pb.ListItemsResponse]:
    """`ListItems` pages of at most `page_size` items (at least one page, empty for no items)."""
    if page_size <= 0:
        raise InvalidRequestError(f"page_size={page_size} must be positive")
    n = len(items.keys)
    dim = int(items.vectors.shape[1]) if items.vectors.ndim == 2 else 0
    for start in range(0, max(n, 1), page_size):
        page = pb.ListItemsResponse(dim=dim)
        for row in range(start, min(start + page_size, n)):
            vector = np.asarray(items.vectors[row]).astype("<f4").tobytes() if include_vectors else b""
            page.items.add(key=items.keys[row], vector=vector, attributes=items.attributes[row])
        yield page


def items_from_proto(page: pb.ListItemsResponse) -> FetchedItems:
    """One page of `ListItems` as `FetchedItems` (vectors (n, dim) float32; (n, 0) when not sent)."""
    n = len(page.items)
    with_vectors = n > 0 and all(len(item.vector) == 4 * page.dim for item in page.items)
    if with_vectors:
        vectors = np.frombuffer(b"".join(item.vector for item in page.items), dtype="<f4").astype(np.float32)
        vectors = vectors.reshape(n, page.dim)
    else:
        vectors = np.zeros((n, 0), dtype=np.float32)
    return FetchedItems(
        keys=[item.key for item in page.items],
        vectors=vectors,
        attributes=[dict(item.attributes) for item in page.items],
    )


# -- Neighbors --------------------------------------------------------------------------------------------------


def neighbor_query_to_proto(query: NeighborQuery) -> pb.Query:
    if query.key is not None:
        return pb.Query(key=query.key)
    if query.vector is not None:
        return pb.Query(vector=np.asarray(query.vector, dtype="<f4").tobytes())
    return pb.Query(image=query.image)


def neighbor_query_from_proto(query: pb.Query, position: int = 0) -> NeighborQuery:
    """The query of one `Query` (InvalidRequestError when it has no kind or a vector of a partial float)."""
    kind = query.WhichOneof("kind")
    if kind == "key":
        return NeighborQuery(key=query.key)
    if kind == "image":
        return NeighborQuery(image=query.image)
    if kind == "vector":
        if len(query.vector) % 4:
            raise InvalidRequestError(
                f"query {position}: a vector of {len(query.vector)} bytes is not little-endian float32 values"
            )
        return NeighborQuery(vector=np.frombuffer(query.vector, dtype="<f4").astype(np.float32))
    raise InvalidRequestError(f"query {position} has no key, vector or image")


def neighbors_search_to_proto(search: NeighborsSearch) -> pb.NeighborsRequest:
    return pb.NeighborsRequest(
        collection=search.collection,
        k=search.k,
        filter=search.filter,
        queries=[neighbor_query_to_proto(q) for q in search.queries],
        exclude_self=search.exclude_self,
    )


def neighbors_search_from_proto(request: pb.NeighborsRequest) -> NeighborsSearch:
    """The search a `NeighborsRequest` asks for (k 0 means `DEFAULT_K`; the range is the use case's to check)."""
    return NeighborsSearch(
        queries=[neighbor_query_from_proto(q, i) for i, q in enumerate(request.queries)],
        k=request.k or DEFAULT_K,
        collection=request.collection,
        filter=request.filter,
        exclude_self=request.exclude_self,
    )


def neighbors_to_proto(results: Sequence[QueryNeighbors], metric: str) -> pb.NeighborsResponse:
    """One `QueryResult` per query, in order: its neighbours, best first, or its error."""
    response = pb.NeighborsResponse(metric=metric)
    for result in results:
        out = response.results.add()
        if result.error is not None:
            _set_status(out.error, result.error.code, result.error.reason, result.error.message)
            continue
        for hit in result.neighbors:
            out.neighbors.add(key=hit.key, score=hit.score, attributes=hit.attributes)
    return response


def neighbors_from_proto(response: pb.NeighborsResponse) -> list[QueryNeighbors]:
    out: list[QueryNeighbors] = []
    for result in response.results:
        if result.HasField("error"):
            e = result.error
            out.append(QueryNeighbors([], QueryError(e.code, e.reason, e.message)))
            continue
        hits = [Neighbor(key=n.key, score=float(n.score), attributes=dict(n.attributes)) for n in result.neighbors]
        out.append(QueryNeighbors(hits))
    return out
