"""The calls of the `embedserve.v1.EmbedderService` API, built once for the sync and the async client.

Each function returns a `Call`: the stub method's name, the request message (built by `service.wire.convert`) and
the function that turns the response into records. `EmbedClient` runs a call blocking, `AsyncEmbedClient` awaits
it; neither builds a message or reads a field itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from service.client.channel import RemoteError
from service.errors import InvalidRequestError
from service.types import (
    CollectionInfo,
    EmbedBatch,
    EmbedResult,
    FetchedItems,
    ImageData,
    ModelInfo,
    NeighborQuery,
    NeighborsSearch,
    QueryNeighbors,
    VectorDType,
)
from service.wire import convert
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb

R = TypeVar("R")

ImageInput = tuple[str, bytes] | tuple[str, bytes, Mapping[str, str]]
"""(key, encoded bytes) of one image, optionally with attributes to store with it (label, path, ...)."""


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One unary call: `stub.<method>(request)`, its response turned into `R` by `parse`."""

    method: str
    request: Any
    parse: Callable[[Any], R]


def image_data(image: ImageInput) -> ImageData:
    """The `ImageData` of a (key, bytes[, attributes]) tuple."""
    attributes = image[2] if len(image) > 2 else {}
    return ImageData(image[0], image[1], dict(attributes))


def embed_batch(
    images: Iterable[ImageInput],
    *,
    dtype: VectorDType = "float32",
    return_vectors: bool = True,
    store: bool = False,
    collection: str = "",
) -> EmbedBatch:
    """The `EmbedBatch` of (key, bytes[, attributes]) tuples."""
    return EmbedBatch(
        images=[image_data(image) for image in images],
        dtype=dtype,
        return_vectors=return_vectors,
        store=store,
        collection=collection,
    )


def embed_stream_request(images: Iterable[ImageInput], *, dtype: VectorDType = "float32") -> pb.EmbedStreamRequest:
    """One `EmbedStreamRequest` for (key, bytes[, attributes]) tuples."""
    return convert.embed_batch_to_stream_proto(embed_batch(images, dtype=dtype))


def parse_embed(response: pb.EmbedResponse | pb.EmbedStreamResponse) -> list[EmbedResult]:
    """`EmbedResult`s of a response; a vector that does not match its dimension is DATA_LOSS."""
    try:
        return convert.embed_results_from_proto(response)
    except InvalidRequestError as e:
        raise RemoteError(grpc.StatusCode.DATA_LOSS, str(e)) from e


def embed(images: Sequence[ImageInput], **options: Any) -> Call[list[EmbedResult]]:
    return Call("Embed", convert.embed_batch_to_proto(embed_batch(images, **options)), parse_embed)


def neighbors(
    queries: Sequence[NeighborQuery], *, k: int, collection: str, filter: str, exclude_self: bool
) -> Call[list[QueryNeighbors]]:
    search = NeighborsSearch(
        queries=list(queries), k=k, collection=collection, filter=filter, exclude_self=exclude_self
    )
    return Call("Neighbors", convert.neighbors_search_to_proto(search), convert.neighbors_from_proto)


def delete_items(keys: Sequence[str], *, collection: str) -> Call[int]:
    return Call("DeleteItems", pb.DeleteItemsRequest(collection=collection, keys=list(keys)), lambda r: int(r.deleted))


def list_items_request(
    *, collection: str, keys: Sequence[str] | None, include_vectors: bool, page_size: int
) -> pb.ListItemsRequest:
    return pb.ListItemsRequest(
        collection=collection, keys=list(keys or ()), page_size=page_size, include_vectors=include_vectors
    )


def collection_info(collection: str) -> Call[CollectionInfo]:
    request = pb.GetCollectionInfoRequest(collection=collection)
    return Call("GetCollectionInfo", request, lambda r: convert.collection_info_from_proto(r.collection))


def list_collections() -> Call[list[CollectionInfo]]:
    return Call(
        "ListCollections",
        pb.ListCollectionsRequest(),
        lambda r: [convert.collection_info_from_proto(info) for info in r.collections],
    )


def create_collection(name: str, *, dim: int, metric: str, index_type: str) -> Call[CollectionInfo]:
    request = pb.CreateCollectionRequest(name=name, dim=dim, metric=metric, index_type=index_type)
    return Call("CreateCollection", request, lambda r: convert.collection_info_from_proto(r.collection))


def drop_collection(name: str) -> Call[None]:
    return Call("DropCollection", pb.DropCollectionRequest(name=name), lambda r: None)


def model_info() -> Call[ModelInfo]:
    return Call("GetModelInfo", pb.GetModelInfoRequest(), lambda r: convert.model_info_from_proto(r.model_info))


def merge_pages(pages: Sequence[FetchedItems]) -> FetchedItems:
    """Pages of `ListItems` as one `FetchedItems`."""
    if not pages:
        return FetchedItems([], np.zeros((0, 0), np.float32), [])
    return FetchedItems(
        keys=[key for page in pages for key in page.keys],
        vectors=np.concatenate([page.vectors for page in pages]),
        attributes=[a for page in pages for a in page.attributes],
    )
