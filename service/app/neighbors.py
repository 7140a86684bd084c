"""The neighbours use case: nearest stored items to queries by stored key, by vector or by image.

    answer = await Neighbors(index, embedding).search(NeighborsSearch(queries=[NeighborQuery(key="scan-1")], k=10))
    answer.metric, answer.results[0].neighbors[0].key

Planning: vectors of key queries are looked up in the collection, image queries are embedded (through the batcher,
with every other caller's images), vector queries are used as given; then one search runs for every query that has
a vector. A query fails alone (an unknown key, an image that does not decode) with a `QueryError` in its result; a
malformed request fails as a whole (InvalidRequestError).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from service.app.embedding import Embedding, IndexThreads
from service.errors import InvalidRequestError
from service.index.filter import parse_filter
from service.index.store import DEFAULT_COLLECTION, MAX_K, IndexStore
from service.metrics import Metrics
from service.types import CollectionInfo, NeighborsSearch, QueryError, QueryNeighbors

NOT_FOUND = 5
INVALID_ARGUMENT = 3
"""google.rpc codes of the per-query errors (the numbers of grpc.StatusCode)."""


@dataclass(frozen=True, slots=True)
class NeighborsAnswer:
    """The metric of the searched collection (which tells how to read the scores) and one result per query."""

    metric: str
    results: list[QueryNeighbors]


class Neighbors:
    """Searches the index for the neighbours of key, vector and image queries."""

    def __init__(self, index: IndexStore, embedding: Embedding, *, threads: IndexThreads, metrics: Metrics) -> None:
        self.index = index
        self.embedding = embedding
        self.threads = threads
        self.metrics = metrics

    async def search(self, search: NeighborsSearch, *, timeout: float | None = None) -> NeighborsAnswer:
        """The `search.k` nearest items to each query, best first, among those matching `search.filter`.

        `timeout` bounds the embedding of image queries. With `exclude_self`, a key query's own item is left out.
        """
        name = search.collection or DEFAULT_COLLECTION
        k, queries = search.k, search.queries
        if not 1 <= k <= MAX_K:
            raise InvalidRequestError(f"k={k} must be 1..{MAX_K}")
        if len(queries) > self.embedding.max_images:
            raise InvalidRequestError(f"{len(queries)} queries in one request; at most {self.embedding.max_images}")
        flt = parse_filter(search.filter)
        info: CollectionInfo = await self.threads.run(self.index.info, name)
        vectors: list[np.ndarray | None] = [None] * len(queries)
        errors: dict[int, QueryError] = {}
        for i, query in enumerate(queries):
            if query.vector is not None:
                vector = np.asarray(query.vector, dtype=np.float32)
                if vector.shape != (info.dim,):
                    raise InvalidRequestError(
                        f"query {i}: a vector of {4 * vector.size} bytes; collection {name!r} wants {info.dim} "
                        f"little-endian float32 values ({4 * info.dim} bytes)"
                    )
                vectors[i] = vector
        key_positions = [i for i, q in enumerate(queries) if q.key is not None]
        if key_positions:
            keys = [queries[i].key or "" for i in key_positions]
            found = await self.threads.run(self.index.fetch_vectors, name, keys)
            for i, key, stored in zip(key_positions, keys, found, strict=True):
                if stored is None:
                    message = f"collection {name!r} has no item with key {key!r}"
                    errors[i] = QueryError(NOT_FOUND, "key_not_found", message)
                vectors[i] = stored
        image_positions = [i for i, q in enumerate(queries) if q.image is not None]
        if image_positions:
            model_dim = self.embedding.model_info().embedding_dim
            if model_dim != info.dim:
                raise InvalidRequestError(
                    f"collection {name!r} holds {info.dim}-d vectors but the model makes {model_dim}-d "
                    "ones; image queries need a collection of this model's embeddings"
                )
            outcomes = await self.embedding.embed_images(
                [queries[i].image or b"" for i in image_positions], timeout=timeout
            )
            for i, outcome in zip(image_positions, outcomes, strict=True):
                if outcome.error is not None:
                    errors[i] = QueryError(INVALID_ARGUMENT, outcome.error.reason, outcome.error.message)
                vectors[i] = outcome.vector
        results = [QueryNeighbors([], errors.get(i)) for i in range(len(queries))]
        ready = [i for i in range(len(queries)) if vectors[i] is not None]
        if not ready:
            return NeighborsAnswer(info.metric, results)
        exclude = [queries[i].key if search.exclude_self else None for i in ready]
        started = time.perf_counter()
        found_neighbors = await self.threads.run(
            self.index.search,
            name,
            np.stack([vectors[i] for i in ready]),  # type: ignore[misc]
            k,
            filter=flt,
            exclude_keys=exclude,
        )
        self.metrics.index_search_duration.observe(time.perf_counter() - started)
        for i, hits in zip(ready, found_neighbors, strict=True):
            results[i] = QueryNeighbors(list(hits))
        return NeighborsAnswer(info.metric, results)
