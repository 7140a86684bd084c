"""Helpers shared by the index tests: configs, an independent brute-force search, and test data recipes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Config, load_config
from service.index.filter import parse_filter
from service.index.store import IndexStore

DIM = 24
FILTERS = ["", "label == a", "label == b and patient != 7", "label == a or label == d", "label == nothing"]
"""Filter texts, and (below) the same conditions written as plain Python, for references that do not parse."""
FILTER_PREDICATES: dict[str, Callable[[Mapping[str, str]], bool]] = {
    "": lambda a: True,
    "label == a": lambda a: a.get("label") == "a",
    "label == b and patient != 7": lambda a: a.get("label") == "b" and a.get("patient") != "7",
    "label == a or label == d": lambda a: a.get("label") in ("a", "d"),
    "label == nothing": lambda a: a.get("label") == "nothing",
}


def make_cfg(data_dir: Path, **index: Any) -> Config:
    return load_config(env={}, overrides={"data_dir": str(data_dir), **{f"index.{k}": v for k, v in index.items()}})


def brute_force(
    vectors: dict[str, np.ndarray],
    attributes: dict[str, dict[str, str]],
    queries: np.ndarray,
    k: int,
    metric: str,
    flt: str = "",
) -> list[list[tuple[str, float]]]:
    """Independent reference: score every live item in float64, keep the matching ones, sort."""
    parsed = parse_filter(flt)
    keys = [key for key in sorted(vectors) if parsed is None or parsed.matches(attributes[key])]
    if not keys:
        return [[] for _ in queries]
    base = np.stack([vectors[key] for key in keys]).astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ base.T
        order = np.argsort(-scores, axis=1)
    else:
        scores = ((q[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1)
    return [[(keys[j], float(scores[i, j])) for j in order[i, :k]] for i in range(len(queries))]


def check_equal(got: list[list[Any]], expected: list[list[tuple[str, float]]]) -> None:
    for hits, ref in zip(got, expected, strict=True):
        assert [h.key for h in hits] == [key for key, _ in ref]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in ref], rtol=1e-4, atol=1e-4)


def populate(store: IndexStore, name: str, rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    """n items, then replace a tenth of them (new vectors and attributes) and delete another tenth."""
    keys = [f"item-{i:05d}" for i in range(n)]
    vectors = {key: rng.normal(size=DIM).astype(np.float32) for key in keys}
    attributes = {key: {"label": "abcd"[i % 4], "patient": str(i % 13)} for i, key in enumerate(keys)}
    for start in range(0, n, 500):
        chunk = keys[start : start + 500]
        store.upsert(name, chunk, np.stack([vectors[k] for k in chunk]), [attributes[k] for k in chunk])
    replaced = keys[::10]
    for key in replaced:
        vectors[key] = rng.normal(size=DIM).astype(np.float32)
        attributes[key] = {"label": "d", "patient": "7"}
    store.upsert(name, replaced, np.stack([vectors[k] for k in replaced]), [attributes[k] for k in replaced])
    deleted = keys[5::10]
    assert store.delete(name, [*deleted, "never-stored"]) == len(deleted)
    for key in deleted:
        del vectors[key], attributes[key]
    return vectors, attributes


# -- the data directory in data/v1: written by the index before it was split into modules ---------------------------
# Made once with service/index/store.py and wal.py of commit 9f6d3bb: IndexStore.open(make_cfg(V1_DATA_DIR,
# **V1_OVERRIDES)), create_collection("oct", dim=4, metric="cosine", index_type="flat") and ("ann", dim=8,
# metric="l2", index_type="ivf_flat"), v1_writes(store, snapshot=wait_idle + store.snapshot), close(snapshot=False),
# then the LOCK file removed.

V1_DATA_DIR = Path(__file__).parent / "data" / "v1"
V1_OVERRIDES: dict[str, Any] = {"index.train_min_vectors": 200, "index.device": "cpu", "index.exact_backend": "faiss"}


class Model:
    """What a collection should hold after a sequence of writes: a dict per key, applied in order."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.attributes: dict[str, dict[str, str]] = {}

    def upsert(self, keys: list[str], vectors: np.ndarray, attributes: list[dict[str, str]]) -> None:
        for key, vector, attrs in zip(keys, vectors, attributes, strict=True):
            self.vectors[key], self.attributes[key] = vector, attrs

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.vectors.pop(key, None)
            self.attributes.pop(key, None)


def v1_writes(sink: Any, snapshot: Callable[[str], object]) -> None:
    """The writes that made data/v1, replayed into `sink` (an IndexStore or a dict of `Model`s by collection):
    collection `oct` (cosine, 4-d, flat) with a snapshot and log records after it; collection `ann` (l2, 8-d,
    ivf_flat) with its built index in the snapshot."""
    rng = np.random.default_rng(2024)
    is_model = isinstance(sink, dict)

    def upsert(name: str, keys: list[str], vectors: np.ndarray, attributes: list[dict[str, str]]) -> None:
        if is_model:
            sink[name].upsert(keys, vectors, attributes)
        else:
            sink.upsert(name, keys, vectors, attributes)

    def delete(name: str, keys: list[str]) -> None:
        if is_model:
            sink[name].delete(keys)
        else:
            sink.delete(name, keys)

    keys = [f"scan-{i:02d}.jpeg" for i in range(20)] + ["Ωμέγα/画像.jpeg", "emoji-🙂"]
    attrs = [{"label": "abc"[i % 3], "patient": str(i % 5)} if i % 4 else {} for i in range(len(keys))]
    upsert("oct", keys, rng.normal(size=(len(keys), 4)).astype(np.float32), attrs)
    delete("oct", keys[3:6])
    upsert("oct", keys[:2], rng.normal(size=(2, 4)).astype(np.float32), [{"label": "z"}, {"label": "z"}])
    ann_keys = [f"a{i:03d}" for i in range(300)]
    upsert("ann", ann_keys, rng.normal(size=(300, 8)).astype(np.float32), [{"g": str(i % 3)} for i in range(300)])
    snapshot("ann")
    snapshot("oct")
    upsert("oct", ["late-1", "late-ünï🙂"], rng.normal(size=(2, 4)).astype(np.float32), [{"k": "v"}, {}])
    delete("oct", ["scan-07.jpeg"])
    delete("ann", ann_keys[:10])


def v1_expected() -> dict[str, Model]:
    """What data/v1 holds (raw vectors as written; `oct` is cosine, so its stored vectors are these normalised)."""
    models = {"oct": Model(), "ann": Model()}
    v1_writes(models, lambda name: None)
    return models
