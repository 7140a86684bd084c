"""The neighbours and embedding use cases over a real IndexStore in tmp_path, without gRPC.

Image queries go through a fake batcher that maps known bytes to known vectors; every search is compared with a
brute-force numpy search over the same vectors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from service.app.embedding import Embedding, IndexThreads
from service.app.neighbors import Neighbors
from service.config import load_config
from service.errors import InvalidImageError, InvalidRequestError
from service.index.store import IndexStore
from service.metrics import Metrics
from service.types import EmbedBatch, EmbedOutcome, ImageData, ModelInfo, NeighborQuery, NeighborsSearch

DIM = 8
INFO = ModelInfo(
    backbone="fake",
    embedding_dim=DIM,
    input_size=4,
    precision="fp32",
    device="cpu",
    decode_backend="none",
    resize="squash",
    pad="zero",
    version="0",
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeBatcher:
    """`embed(datas)`: the vector registered for each byte string; unknown bytes fail as invalid images."""

    def __init__(self, vectors: dict[bytes, np.ndarray]) -> None:
        self.vectors = vectors

    async def embed(
        self, datas: Sequence[bytes], *, timeout: float | None = None, wait: bool = False
    ) -> list[EmbedOutcome]:
        return [
            EmbedOutcome(vector=self.vectors[d]) if d in self.vectors else EmbedOutcome(error=InvalidImageError("no"))
            for d in datas
        ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[IndexStore]:
    index = IndexStore.open(load_config(env={}, overrides={"data_dir": str(tmp_path)}))
    yield index
    index.close()


def _use_cases(index: IndexStore, batcher: FakeBatcher) -> tuple[Embedding, Neighbors, IndexThreads]:
    threads = IndexThreads(2)
    metrics = Metrics()
    embedding = Embedding(index, threads=threads, max_images=64, metrics=metrics)
    embedding.attach(batcher, INFO)
    return embedding, Neighbors(index, embedding, threads=threads, metrics=metrics), threads


def _brute_force(
    vectors: np.ndarray,
    keys: list[str],
    attrs: list[dict[str, str]],
    q: np.ndarray,
    k: int,
    label: str | None,
    exclude: str | None,
) -> list[tuple[str, float]]:
    scores = vectors @ q
    rows = [i for i in np.argsort(-scores) if (label is None or attrs[i]["label"] == label) and keys[i] != exclude]
    return [(keys[i], float(scores[i])) for i in rows[:k]]


def test_neighbors_by_key_vector_and_image_match_a_brute_force_search(store: IndexStore) -> None:
    rng = np.random.default_rng(3)
    n = 60
    vectors = _unit(rng.normal(size=(n, DIM)))
    keys = [f"item-{i:02d}" for i in range(n)]
    attrs = [{"label": "A" if i % 3 else "B", "path": f"/data/{i}.jpeg"} for i in range(n)]
    images = {f"jpeg-{i}".encode(): vectors[i] for i in range(n)}
    query_image = _unit(rng.normal(size=DIM))
    images[b"query-image"] = query_image
    embedding, neighbors, threads = _use_cases(store, FakeBatcher(images))

    async def run() -> None:
        batch = EmbedBatch(
            images=[ImageData(keys[i], f"jpeg-{i}".encode(), attrs[i]) for i in range(n)],
            store=True,
            collection="c",
        )
        embedding.validate(batch)
        outcomes = await embedding.embed(batch, timeout=None)
        assert all(o.ok for o in outcomes)
        free_vector = _unit(rng.normal(size=DIM))
        queries = [
            NeighborQuery(key="item-07"),
            NeighborQuery(vector=free_vector),
            NeighborQuery(image=b"query-image"),
            NeighborQuery(key="missing"),
            NeighborQuery(image=b"not an image"),
        ]
        for flt, label in (("", None), ("label == B", "B")):
            for exclude_self in (False, True):
                answer = await neighbors.search(
                    NeighborsSearch(queries=queries, k=5, collection="c", filter=flt, exclude_self=exclude_self)
                )
                assert answer.metric == "cosine" and len(answer.results) == len(queries)
                expected = [
                    _brute_force(vectors, keys, attrs, vectors[7], 5, label, "item-07" if exclude_self else None),
                    _brute_force(vectors, keys, attrs, free_vector, 5, label, None),
                    _brute_force(vectors, keys, attrs, query_image, 5, label, None),
                ]
                for result, want in zip(answer.results[:3], expected, strict=True):
                    assert result.ok
                    assert [h.key for h in result.neighbors] == [key for key, _ in want]
                    np.testing.assert_allclose([h.score for h in result.neighbors], [s for _, s in want], atol=1e-5)
                    assert all(h.attributes == attrs[keys.index(h.key)] for h in result.neighbors)
                missing, bad_image = answer.results[3:]
                assert missing.error is not None and missing.error.reason == "key_not_found" and missing.error.code == 5
                assert bad_image.error is not None and bad_image.error.reason == "invalid_image"
                assert not missing.neighbors and not bad_image.neighbors

    try:
        asyncio.run(run())
    finally:
        threads.shutdown()


def test_bad_requests_fail_as_a_whole(store: IndexStore) -> None:
    embedding, neighbors, threads = _use_cases(store, FakeBatcher({}))
    store.create_collection("c", dim=DIM)

    async def refused(search: NeighborsSearch) -> str:
        with pytest.raises(InvalidRequestError) as e:
            await neighbors.search(search)
        return str(e.value)

    try:
        assert "k=0" in asyncio.run(refused(NeighborsSearch(queries=[NeighborQuery(key="x")], k=0, collection="c")))
        wrong = NeighborsSearch(queries=[NeighborQuery(vector=np.ones(3, np.float32))], collection="c")
        assert "12 bytes" in asyncio.run(refused(wrong))
        too_many = NeighborsSearch(queries=[NeighborQuery(key=str(i)) for i in range(65)], collection="c")
        assert "65 queries" in asyncio.run(refused(too_many))
        with pytest.raises(InvalidRequestError, match="non-empty key"):
            embedding.validate(EmbedBatch(images=[ImageData("", b"x")], store=True))
        with pytest.raises(InvalidRequestError, match="65 images"):
            embedding.validate(EmbedBatch(images=[ImageData(str(i), b"x") for i in range(65)]))
    finally:
        threads.shutdown()
