"""Durable collections of vectors with string keys and attributes, searched exactly or approximately.

    store = IndexStore.open(cfg)                       # loads every collection under cfg.data_dir
    store.create_collection("oct", dim=1280)           # cosine by default
    store.upsert("oct", ["CNV/1.jpeg"], vectors, [{"label": "CNV"}])   # durable when it returns
    hits = store.search("oct", queries, k=10, filter="label == DME")
    store.close()

Each collection has a fixed dimension and metric. `cosine` stores unit vectors (others are normalised on the way
in) and scores by cosine similarity, highest first; `l2` scores by squared Euclidean distance, lowest first.
Upserting an existing key replaces its vector and attributes.

Search is exact (faiss-cpu, faiss-gpu or torch, see `service.index.backends`) unless the collection's index type is
`ivf_flat`, `ivf_pq` or `hnsw` and that index is built: it is trained in the background once the collection holds
`index.train_min_vectors` items, and searched with a FAISS id selector for filters and deleted items. Its candidates
(`k * refine_factor`) are re-scored exactly. Filters matching few items, or approximate searches that come back
short, are answered exactly over the matching items.

Durability, per collection directory `data_dir/collections/<name>/`:
- `collection.json`: dimension, metric and index parameters, written once at creation;
- `wal-<generation>.log`: the write-ahead log (`service.index.wal`). An upsert or delete is appended and applied
  under the
  collection's lock, then fsync'd (group commit) before the call returns;
- `snapshot.npz`: vectors, ids, keys, attributes and the built approximate index, written to a temporary file,
  fsync'd and `os.replace`d. Taken after `snapshot_every_records` records or `snapshot_every_bytes` log bytes, and on
  `close()`; the log generations it covers are then deleted.
On open, the snapshot is loaded and the newer log generations replayed; a torn or corrupt tail of a log (from a
crash mid-write) is dropped with a warning. A `LOCK` file (flock) keeps two stores off one data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import queue
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from service.config import Config, IndexConfig
from service.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DataDirLockedError,
    DurabilityError,
    InvalidIndexRequestError,
    KeyNotFoundError,
)
from service.index.backends import (
    AnnParams,
    ExactSearcher,
    SearchMetric,
    ann_search,
    build_ann,
    filters_by_selector,
    make_exact_searcher,
)
from service.index.filter import Filter, parse_filter
from service.index.wal import WriteAheadLog, fsync_dir, generations, log_path, replay
from service.types import CollectionInfo, FetchedItems, Neighbor

__all__ = [
    "DEFAULT_COLLECTION",
    "CollectionInfo",
    "CollectionNotFoundError",
    "CollectionSpec",
    "FetchedItems",
    "IndexStore",
    "KeyNotFoundError",
    "Neighbor",
]

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "default"
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Allowed collection names (also directory names and metric label values)."""
MAX_KEY_BYTES = 4096
MAX_K = 10_000
INDEX_TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")
METRICS = ("cosine", "l2")
_UNIT_TOLERANCE = 1e-5
"""Cosine vectors whose norm is this close to 1 are stored as given (bit-identical to what the caller sent)."""
_SNAPSHOT = "snapshot.npz"
_SPEC = "collection.json"
_OP_UPSERT = b"U"
_OP_DELETE = b"D"
_U32 = struct.Struct("<I")
_MAX_CANDIDATES = 4096
"""Most candidates one approximate search fetches per query (beyond, the filter is too selective: search exactly)."""


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """The fixed settings of a collection, stored in `collection.json`."""

    name: str
    dim: int
    metric: str = "cosine"
    index_type: str = "flat"
    nlist: int = 0
    pq_m: int = 16
    pq_nbits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200

    @property
    def search_metric(self) -> SearchMetric:
        return "ip" if self.metric == "cosine" else "l2"

    def ann_params(self) -> AnnParams:
        return AnnParams(
            index_type=self.index_type,
            dim=self.dim,
            nlist=self.nlist,
            pq_m=self.pq_m,
            pq_nbits=self.pq_nbits,
            hnsw_m=self.hnsw_m,
            ef_construction=self.ef_construction,
        )

    def validate(self) -> None:
        check_collection_name(self.name)
        if not 1 <= self.dim <= 65536:
            raise InvalidIndexRequestError(f"dim={self.dim} must be 1..65536")
        if self.metric not in METRICS:
            raise InvalidIndexRequestError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.index_type not in INDEX_TYPES:
            raise InvalidIndexRequestError(f"index type {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        if self.index_type == "ivf_pq" and self.dim % self.pq_m:
            raise InvalidIndexRequestError(
                f"ivf_pq needs index.pq_m ({self.pq_m}) to divide the dimension {self.dim}; pick a divisor"
            )


def check_collection_name(name: str) -> None:
    if not COLLECTION_NAME.match(name):
        raise InvalidIndexRequestError(
            f"collection name {name!r} is not allowed; use 1-64 characters from A-Z a-z 0-9 _ -"
        )


def _check_keys(keys: Sequence[str]) -> None:
    for key in keys:
        if not isinstance(key, str) or not key:
            raise InvalidIndexRequestError("every stored item needs a non-empty key")
        if len(key.encode()) > MAX_KEY_BYTES:
            raise InvalidIndexRequestError(f"key {key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `write(handle)` to `path.tmp`, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, separators=(",", ":")).encode(), dtype=np.uint8)


@dataclass(slots=True)
class _Snapshot:
    """A consistent copy of a collection, taken under its lock, written outside it."""

    generation: int
    next_id: int
    vectors: np.ndarray
    ids: np.ndarray
    keys: list[str]
    attributes: list[dict[str, str]]
    ann: np.ndarray | None


class Collection:
    """One collection in memory plus its log. Use it through `IndexStore`; every method is thread-safe.

    Rows are dense (0..count-1; a delete moves the last row into the hole). Each stored version of an item gets a
    new, never reused id: approximate indexes address items by id, and ids that are no longer live are excluded
    from their searches until the next rebuild.
    """

    def __init__(self, spec: CollectionSpec, directory: Path, cfg: IndexConfig, searcher: ExactSearcher) -> None:
        self.spec = spec
        self.directory = directory
        self.cfg = cfg
        self.searcher = searcher
        self.lock = threading.RLock()
        self.snapshot_lock = threading.Lock()
        self.vectors = np.zeros((0, spec.dim), dtype=np.float32)
        self.ids = np.zeros(0, dtype=np.int64)
        self.count = 0
        self.keys: list[str] = []
        self.attributes: list[dict[str, str]] = []
        self.row_of_key: dict[str, int] = {}
        self.row_of_id: dict[int, int] = {}
        self.next_id = 0
        self.ann: Any = None
        self.building = False
        self.version = 0
        self.dropped = False
        self.wal: WriteAheadLog | None = None
        self.cache_key = f"{spec.name}:{uuid.uuid4().hex}"

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self, on_sync: Callable[[float, int], None] | None) -> None:
        """Load the snapshot, replay the log after it, and open the log for appends."""
        first_generation = 1
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()  # a snapshot cut short by a crash; the previous one and the log are intact
        snapshot = self.directory / _SNAPSHOT
        if snapshot.exists():
            first_generation = self._load_snapshot(snapshot)
        replayed = 0
        for _, payload in replay(self.directory, first_generation):
            self._apply(payload)
            replayed += 1
        for stale in generations(self.directory):
            if stale < first_generation:
                log_path(self.directory, stale).unlink()
        current = max([first_generation, *generations(self.directory)])
        self.wal = WriteAheadLog(self.directory, current, fsync=self.cfg.fsync, on_sync=on_sync)
        self.wal.records = replayed  # not in the snapshot yet: they count toward the next one
        logger.info(
            "collection %s: %d items (%d log records replayed, log generation %d)",
            self.spec.name,
            self.count,
            replayed,
            current,
        )

    def _load_snapshot(self, path: Path) -> int:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            records = json.loads(data["records"].tobytes())
            vectors = np.ascontiguousarray(data["vectors"], dtype=np.float32)
            ids = np.ascontiguousarray(data["ids"], dtype=np.int64)
            ann = data["ann"]
        keys, attributes = records["keys"], records["attributes"]
        if vectors.shape != (len(keys), self.spec.dim) or len(ids) != len(keys):
            raise InvalidIndexRequestError(
                f"snapshot {path} is inconsistent: {vectors.shape} vectors, {len(keys)} keys"
            )
        self._reserve(len(keys))
        n = len(keys)
        self.vectors[:n] = vectors
        self.ids[:n] = ids
        self.count = n
        self.keys = list(keys)
        self.attributes = [dict(a) for a in attributes]
        self.row_of_key = {key: row for row, key in enumerate(self.keys)}
        self.row_of_id = {int(i): row for row, i in enumerate(ids)}
        self.next_id = int(meta["next_id"])
        if ann.size:
            self.ann = faiss.deserialize_index(ann)
        return int(meta["generation"])

    # -- mutation ------------------------------------------------------------------------------------------------

    def _reserve(self, n: int) -> None:
        if n <= self.vectors.shape[0]:
            return
        capacity = max(n, 2 * self.vectors.shape[0], 1024)
        vectors = np.zeros((capacity, self.spec.dim), dtype=np.float32)
        vectors[: self.count] = self.vectors[: self.count]
        ids = np.zeros(capacity, dtype=np.int64)
        ids[: self.count] = self.ids[: self.count]
        self.vectors, self.ids = vectors, ids

    def prepare_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Validate (shape, finite) and, for cosine, normalise vectors that are not unit length already."""
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.spec.dim:
            raise InvalidIndexRequestError(
                f"collection {self.spec.name!r} holds {self.spec.dim}-d vectors; got shape {tuple(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise InvalidIndexRequestError("vectors must be finite (no NaN or infinity)")
        if self.spec.metric == "cosine" and len(array):
            norms = np.linalg.norm(array, axis=1)
            if (norms == 0).any():
                raise InvalidIndexRequestError(
                    "a zero vector has no direction; it cannot be stored or searched by cosine"
                )
            off = np.abs(norms - 1.0) > _UNIT_TOLERANCE
            if off.any():
                array = array.copy()
                array[off] /= norms[off, None]
        return np.ascontiguousarray(array)

    def _check_open(self) -> None:
        if self.dropped:
            raise CollectionNotFoundError(f"collection {self.spec.name!r} was dropped")

    def upsert(self, keys: Sequence[str], vectors: np.ndarray, attributes: Sequence[Mapping[str, str]]) -> int:
        """Insert or replace items; returns once the write is durable."""
        prepared = self.prepare_vectors(vectors)
        if not len(keys) == len(prepared) == len(attributes):
            raise InvalidIndexRequestError(
                f"{len(keys)} keys, {len(prepared)} vectors and {len(attributes)} attribute maps do not match"
            )
        if not keys:
            return 0
        _check_keys(keys)
        attrs = [{str(k): str(v) for k, v in a.items()} for a in attributes]
        meta = json.dumps({"keys": list(keys), "attributes": attrs}, separators=(",", ":")).encode()
        payload = b"".join((_OP_UPSERT, _U32.pack(len(meta)), meta, prepared.tobytes()))
        return self._write(payload)

    def delete(self, keys: Sequence[str]) -> int:
        """Delete the items with these keys (unknown keys are ignored); returns how many existed. Durable on return."""
        if not keys:
            return 0
        payload = _OP_DELETE + json.dumps(list(keys), separators=(",", ":")).encode()
        return self._write(payload)

    def _write(self, payload: bytes) -> int:
        """Append, apply (both under the lock, so the log order is the apply order), then wait for the fsync."""
        with self.lock:
            self._check_open()
            if self.wal is None:
                raise DurabilityError(f"collection {self.spec.name!r} has no open log")
            try:
                seq = self.wal.append(payload)
            except OSError as e:
                raise DurabilityError(f"could not append to the log of {self.spec.name!r}: {e.strerror or e}") from e
            changed = self._apply(payload)
            wal = self.wal
        try:
            wal.sync(seq)
        except OSError as e:
            raise DurabilityError(f"could not fsync the log of {self.spec.name!r}: {e.strerror or e}") from e
        return changed

    def _apply(self, payload: bytes) -> int:
        """Apply one log record; returns the items it wrote or deleted."""
        op = payload[:1]
        if op == _OP_UPSERT:
            (meta_len,) = _U32.unpack_from(payload, 1)
            start = 1 + _U32.size
            meta = json.loads(payload[start : start + meta_len])
            vectors = np.frombuffer(payload, dtype=np.float32, offset=start + meta_len)
            vectors = vectors.reshape(len(meta["keys"]), self.spec.dim)
            self._apply_upsert(meta["keys"], vectors, meta["attributes"])
            return len(meta["keys"])
        if op == _OP_DELETE:
            return self._apply_delete(json.loads(payload[1:]))
        raise ValueError(f"unknown log record type {op!r} in collection {self.spec.name!r}")

    def _apply_upsert(self, keys: list[str], vectors: np.ndarray, attributes: list[dict[str, str]]) -> None:
        self._reserve(self.count + len(keys))
        new_ids = np.arange(self.next_id, self.next_id + len(keys), dtype=np.int64)
        self.next_id += len(keys)
        for key, vector, attrs, new_id in zip(keys, vectors, attributes, new_ids.tolist(), strict=True):
            row = self.row_of_key.get(key)
            if row is None:
                row = self.count
                self.count += 1
                self.keys.append(key)
                self.attributes.append(attrs)
                self.row_of_key[key] = row
            else:
                del self.row_of_id[int(self.ids[row])]
                self.attributes[row] = attrs
            self.vectors[row] = vector
            self.ids[row] = new_id
            self.row_of_id[new_id] = row
        if self.ann is not None:
            self.ann.add_with_ids(np.ascontiguousarray(vectors), new_ids)
        self.version += 1

    def _apply_delete(self, keys: list[str]) -> int:
        deleted = 0
        for key in keys:
            row = self.row_of_key.pop(key, None)
            if row is None:
                continue
            deleted += 1
            del self.row_of_id[int(self.ids[row])]
            last = self.count - 1
            if row != last:
                moved_key = self.keys[last]
                self.vectors[row] = self.vectors[last]
                self.ids[row] = self.ids[last]
                self.keys[row] = moved_key
                self.attributes[row] = self.attributes[last]
                self.row_of_key[moved_key] = row
                self.row_of_id[int(self.ids[row])] = row
            self.keys.pop()
            self.attributes.pop()
            self.count -= 1
        self.version += 1
        return deleted

    # -- reading -------------------------------------------------------------------------------------------------

    def fetch(self, keys: Sequence[str] | None) -> FetchedItems:
        with self.lock:
            self._check_open()
            if keys is None:
                rows = sorted(range(self.count), key=self.keys.__getitem__)
            else:
                missing = [key for key in keys if key not in self.row_of_key]
                if missing:
                    shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
                    raise KeyNotFoundError(
                        f"collection {self.spec.name!r} has no item with key {shown} ({len(missing)} missing)"
                    )
                rows = [self.row_of_key[key] for key in keys]
            index = np.asarray(rows, dtype=np.int64)
            return FetchedItems(
                keys=[self.keys[r] for r in rows],
                vectors=self.vectors[index].copy() if len(index) else np.zeros((0, self.spec.dim), np.float32),
                attributes=[dict(self.attributes[r]) for r in rows],
            )

    def search(
        self, queries: np.ndarray, k: int, flt: Filter | None, exclude: Sequence[str | None] | None
    ) -> list[list[Neighbor]]:
        prepared = self.prepare_vectors(queries)
        extra = 1 if exclude is not None and any(e is not None for e in exclude) else 0
        kk = k + extra
        with self.lock:
            self._check_open()
            n = self.count
            if n == 0 or len(prepared) == 0:
                return [[] for _ in range(len(prepared))]
            mask = flt.mask(self.attributes) if flt is not None else None
            allowed = n if mask is None else int(mask.sum())
            if allowed == 0:
                return [[] for _ in range(len(prepared))]
            rows_subset = None if mask is None else np.flatnonzero(mask)
            use_ann = (
                self.ann is not None
                and allowed >= self.cfg.exact_filter_fraction * n
                and allowed > kk * self.cfg.refine_factor
            )
            if use_ann:
                scores, rows = self._ann_search(prepared, kk, rows_subset)
                short = (rows[:, : min(kk, allowed)] < 0).any(axis=1)
                if short.any():
                    exact_scores, exact_rows = self._exact(prepared[short], kk, rows_subset)
                    scores[short], rows[short] = exact_scores, exact_rows
            else:
                scores, rows = self._exact(prepared, kk, rows_subset)
            results: list[list[Neighbor]] = []
            for i in range(len(prepared)):
                skip = exclude[i] if exclude is not None else None
                hits: list[Neighbor] = []
                for score, row in zip(scores[i].tolist(), rows[i].tolist(), strict=True):
                    if row < 0 or len(hits) == k:
                        break
                    key = self.keys[row]
                    if key == skip:
                        continue
                    hits.append(Neighbor(key=key, score=float(score), attributes=dict(self.attributes[row])))
                results.append(hits)
            return results

    def _exact(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.searcher.search(
            self.vectors[: self.count],
            queries,
            k,
            metric=self.spec.search_metric,
            rows=rows,
            cache_key=self.cache_key,
            version=self.version,
        )

    def _ann_search(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the approximate index, re-scored exactly; (scores, rows) with -1 where short."""
        n = self.count
        candidates = k * self.cfg.refine_factor
        total = max(int(self.ann.ntotal), 1)
        restricted = rows is not None or total != n  # a filter, or dead ids (deleted or replaced) in the index
        allowed_ids = None
        kept = n if rows is None else len(rows)
        widen = total / max(kept, 1)
        if restricted and filters_by_selector(self.ann):
            allowed_ids = self.ids[:n] if rows is None else self.ids[rows]
        elif restricted:
            # Over-fetch in proportion to what the filter keeps, then drop the rest below.
            candidates = min(math.ceil(candidates * widen), _MAX_CANDIDATES)
        _, found_ids = ann_search(
            self.ann,
            queries,
            candidates,
            allowed_ids=allowed_ids,
            id_space=self.next_id,
            nprobe=self.cfg.nprobe,
            ef_search=self.cfg.ef_search,
            widen=widen,
        )
        get = self.row_of_id.get
        cand_rows = np.fromiter((get(int(i), -1) for i in found_ids.ravel()), dtype=np.int64, count=found_ids.size)
        cand_rows = cand_rows.reshape(found_ids.shape)
        if rows is not None:
            allowed_rows = np.zeros(n + 1, dtype=bool)
            allowed_rows[rows] = True
            cand_rows[~allowed_rows[cand_rows]] = -1  # index -1 maps to the last slot, which is False
        gathered = self.vectors[np.maximum(cand_rows, 0)]  # (q, c, d)
        metric = self.spec.search_metric
        if metric == "ip":
            exact = np.einsum("qcd,qd->qc", gathered, queries)
            exact[cand_rows < 0] = -np.inf
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        else:
            diff = gathered - queries[:, None, :]
            exact = np.einsum("qcd,qcd->qc", diff, diff)
            exact[cand_rows < 0] = np.inf
            order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
        best = np.take_along_axis(cand_rows, order, axis=1)
        if best.shape[1] < k:
            pad = k - best.shape[1]
            best = np.pad(best, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf if metric == "ip" else np.inf)
        return scores, best

    # -- maintenance ---------------------------------------------------------------------------------------------

    def needs_build(self) -> bool:
        """An approximate index should be (re)built: enough items and none yet, or too many dead ids in it."""
        if self.spec.index_type == "flat" or self.building or self.dropped:
            return False
        if self.ann is None:
            return self.count >= self.cfg.train_min_vectors
        return int(self.ann.ntotal) > 2 * self.count + 1000

    def needs_snapshot(self) -> bool:
        wal = self.wal
        if wal is None or self.dropped:
            return False
        return wal.records >= self.cfg.snapshot_every_records or wal.bytes >= self.cfg.snapshot_every_bytes

    def build(self) -> bool:
        """Build the approximate index from the live items (off the lock), then catch up and install it."""
        with self.lock:
            if not self.needs_build():
                return False
            self.building = True
            n = self.count
            vectors, ids = self.vectors[:n].copy(), self.ids[:n].copy()
            first_new_id = self.next_id
        try:
            started = time.monotonic()
            index = build_ann(self.spec.ann_params(), vectors, ids)
            with self.lock:
                if self.dropped:
                    return False
                newer = self.ids[: self.count] >= first_new_id
                if newer.any():
                    index.add_with_ids(
                        np.ascontiguousarray(self.vectors[: self.count][newer]), self.ids[: self.count][newer]
                    )
                self.ann = index
            logger.info(
                "collection %s: %s index built over %d vectors in %.1f s",
                self.spec.name,
                self.spec.index_type,
                n,
                time.monotonic() - started,
            )
            return True
        finally:
            with self.lock:
                self.building = False

    def snapshot(self) -> bool:
        """Write a snapshot and delete the log generations it covers; False when there was nothing new to save."""
        with self.snapshot_lock:
            with self.lock:
                if self.dropped or self.wal is None:
                    return False
                if self.wal.records == 0 and (self.directory / _SNAPSHOT).exists():
                    return False
                n = self.count
                state = _Snapshot(
                    generation=0,
                    next_id=self.next_id,
                    vectors=self.vectors[:n].copy(),
                    ids=self.ids[:n].copy(),
                    keys=list(self.keys),
                    attributes=[dict(a) for a in self.attributes],
                    ann=faiss.serialize_index(self.ann) if self.ann is not None else None,
                )
                try:
                    state.generation = self.wal.rotate()
                except OSError as e:
                    raise DurabilityError(f"could not rotate the log of {self.spec.name!r}: {e.strerror or e}") from e
            started = time.monotonic()
            self._write_snapshot(state)
            for old in generations(self.directory):
                if old < state.generation:
                    log_path(self.directory, old).unlink()
            fsync_dir(self.directory)
            logger.info(
                "collection %s: snapshot of %d items written in %.2f s (log generation %d)",
                self.spec.name,
                len(state.keys),
                time.monotonic() - started,
                state.generation,
            )
            return True

    def _write_snapshot(self, state: _Snapshot) -> None:
        meta = {"version": 1, "generation": state.generation, "next_id": state.next_id, "spec": asdict(self.spec)}
        arrays: dict[str, Any] = {
            "meta": _json_bytes(meta),
            "records": _json_bytes({"keys": state.keys, "attributes": state.attributes}),
            "vectors": state.vectors,
            "ids": state.ids,
            "ann": state.ann if state.ann is not None else np.zeros(0, np.uint8),
        }
        _write_atomic(self.directory / _SNAPSHOT, lambda handle: np.savez(handle, **arrays))

    def info(self) -> CollectionInfo:
        with self.lock:
            self._check_open()
            trained = self.spec.index_type == "flat" or self.ann is not None
            backend = self.spec.index_type if self.ann is not None else self.searcher.name
            count = self.count
        size = 0
        with contextlib.suppress(FileNotFoundError):
            for path in self.directory.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
        return CollectionInfo(
            name=self.spec.name,
            dim=self.spec.dim,
            metric=self.spec.metric,
            index_type=self.spec.index_type,
            count=count,
            trained=trained,
            bytes_on_disk=size,
            search_backend=backend,
        )

    def close(self) -> None:
        with self.lock:
            if self.wal is not None:
                self.wal.close()
                self.wal = None
        self.searcher.evict(self.cache_key)


@dataclass(slots=True)
class _Task:
    """Background work on one collection."""

    collection: str
    kind: Literal["build", "snapshot"]


@dataclass(slots=True)
class _Worker:
    """The store's maintenance thread and its queue."""

    tasks: queue.Queue[_Task | None] = field(default_factory=queue.Queue)
    pending: set[tuple[str, str]] = field(default_factory=set)
    thread: threading.Thread | None = None


class IndexStore:
    """Every collection under `data_dir/collections`, thread-safe. Build with `IndexStore.open(cfg)`.

    A maintenance thread builds approximate indexes and writes snapshots in the background. `close()` stops it,
    snapshots the collections with unsaved log records and releases the data directory.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        lock_fd: int,
        searcher: ExactSearcher,
        on_fsync: Callable[[float, int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.index_cfg = cfg.index
        self.root = Path(cfg.data_dir) / "collections"
        self.searcher = searcher
        self.on_fsync = on_fsync
        self._lock_fd = lock_fd
        self._lock = threading.RLock()
        self._collections: dict[str, Collection] = {}
        self._worker = _Worker()
        self._closed = False

    @classmethod
    def open(cls, cfg: Config, *, on_fsync: Callable[[float, int], None] | None = None) -> IndexStore:
        """Lock `cfg.data_dir`, load every collection (snapshot + log replay) and start the maintenance thread.

        `on_fsync(seconds, records)` is called after every log fsync (for metrics). Raises `DataDirLockedError` when
        another store holds the directory.
        """
        root = Path(cfg.data_dir)
        (root / "collections").mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(lock_fd)
            raise DataDirLockedError(
                f"data directory {root} is in use by another embedserve; stop it or use another --data-dir"
            ) from e
        try:
            store = cls(cfg, lock_fd=lock_fd, searcher=make_exact_searcher(cfg.index), on_fsync=on_fsync)
            store._load_all()
        except BaseException:
            os.close(lock_fd)
            raise
        store._start_worker()
        return store

    def _load_all(self) -> None:
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                logger.info("removing leftover %s", path)
                shutil.rmtree(path, ignore_errors=True)
                continue
            spec_path = path / _SPEC
            if not path.is_dir() or not spec_path.exists():
                logger.warning("ignoring %s: not a collection directory", path)
                continue
            spec = CollectionSpec(**json.loads(spec_path.read_text()))
            collection = Collection(spec, path, self.index_cfg, self.searcher)
            collection.load(self.on_fsync)
            self._collections[spec.name] = collection

    # -- collections ---------------------------------------------------------------------------------------------

    def _get(self, name: str) -> Collection:
        with self._lock:
            self._check_not_closed()
            collection = self._collections.get(name)
        if collection is None:
            check_collection_name(name)
            raise CollectionNotFoundError(f"no collection named {name!r}; create it first (or store into it)")
        return collection

    def _check_not_closed(self) -> None:
        if self._closed:
            raise DurabilityError("the index store is closed")

    def create_collection(
        self, name: str, *, dim: int, metric: str | None = None, index_type: str | None = None, exist_ok: bool = False
    ) -> CollectionInfo:
        """Create a collection (metric and index type default to the `index` config); durable on return.

        With `exist_ok`, an existing collection of the same dim and metric is returned as is.
        """
        c = self.index_cfg
        spec = CollectionSpec(
            name=name,
            dim=dim,
            metric=metric or c.metric,
            index_type=index_type or c.type,
            nlist=c.nlist,
            pq_m=c.pq_m,
            pq_nbits=c.pq_nbits,
            hnsw_m=c.hnsw_m,
            ef_construction=c.ef_construction,
        )
        spec.validate()
        with self._lock:
            self._check_not_closed()
            existing = self._collections.get(name)
            if existing is not None:
                same = existing.spec.dim == dim and (metric is None or existing.spec.metric == metric)
                if exist_ok and same:
                    return existing.info()
                raise CollectionExistsError(
                    f"collection {name!r} already exists ({existing.spec.dim}-d, {existing.spec.metric}, "
                    f"{existing.spec.index_type}); drop it first or use another name"
                )
            staging = self.root / f".creating-{name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            (staging / _SPEC).write_text(json.dumps(asdict(spec), indent=1))
            with (staging / _SPEC).open("rb") as handle:
                os.fsync(handle.fileno())
            fsync_dir(staging)
            final = self.root / name
            os.replace(staging, final)
            fsync_dir(self.root)
            collection = Collection(spec, final, self.index_cfg, self.searcher)
            collection.load(self.on_fsync)
            self._collections[name] = collection
            logger.info("created collection %s (%d-d, %s, %s)", name, dim, spec.metric, spec.index_type)
            return collection.info()

    def drop_collection(self, name: str) -> None:
        """Delete a collection and its files; durable on return."""
        collection = self._get(name)
        with collection.snapshot_lock, self._lock:
            with collection.lock:
                collection.dropped = True
                collection.close()
            self._collections.pop(name, None)
            trash = self.root / f".dropped-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(collection.directory, trash)
            fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("dropped collection %s", name)

    def has_collection(self, name: str) -> bool:
        with self._lock:
            return name in self._collections

    def collections(self) -> list[CollectionInfo]:
        """Every collection, by name."""
        with self._lock:
            names = sorted(self._collections)
        infos = []
        for name in names:
            with contextlib.suppress(CollectionNotFoundError):
                infos.append(self._get(name).info())
        return infos

    def info(self, collection: str) -> CollectionInfo:
        return self._get(collection).info()

    def counts(self) -> dict[str, int]:
        """Items per collection (cheap; for metrics)."""
        with self._lock:
            return {name: c.count for name, c in self._collections.items()}

    # -- items ---------------------------------------------------------------------------------------------------

    def upsert(
        self,
        collection: str,
        keys: Sequence[str],
        vectors: np.ndarray,
        attributes: Sequence[Mapping[str, str]] | None = None,
    ) -> int:
        """Insert or replace items (one log record, one group-committed fsync); returns once durable."""
        c = self._get(collection)
        n = c.upsert(keys, vectors, attributes if attributes is not None else [{} for _ in keys])
        self._after_write(c)
        return n

    def delete(self, collection: str, keys: Sequence[str]) -> int:
        """Delete items by key (unknown keys are ignored); returns how many existed. Durable on return."""
        c = self._get(collection)
        n = c.delete(keys)
        self._after_write(c)
        return n

    def count(self, collection: str) -> int:
        return self._get(collection).count

    def keys(self, collection: str) -> list[str]:
        """Every key of a collection, sorted."""
        c = self._get(collection)
        with c.lock:
            return sorted(c.keys)

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems:
        """Stored items of `collection`: those with `keys` in that order, or all of them sorted by key when None.

        Raises `CollectionNotFoundError` for an unknown collection and `KeyNotFoundError` when a key is missing.
        """
        return self._get(collection).fetch(keys)

    def fetch_vectors(self, collection: str, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The stored vector of each key, or None where the collection has no such key."""
        c = self._get(collection)
        with c.lock:
            c._check_open()
            rows = [c.row_of_key.get(key) for key in keys]
            return [None if row is None else c.vectors[row].copy() for row in rows]

    def search(
        self,
        collection: str,
        queries: np.ndarray,
        k: int,
        *,
        filter: str | Filter | None = None,
        exclude_keys: Sequence[str | None] | None = None,
    ) -> list[list[Neighbor]]:
        """The k nearest items to each query vector, best first, among those matching `filter`.

        `exclude_keys[i]` (when not None) is left out of query i's results (e.g. the key a query vector came from).
        """
        if not 1 <= k <= MAX_K:
            raise InvalidIndexRequestError(f"k={k} must be 1..{MAX_K}")
        parsed = parse_filter(filter) if isinstance(filter, str) else filter
        if exclude_keys is not None and len(exclude_keys) != len(queries):
            raise InvalidIndexRequestError(f"{len(exclude_keys)} exclusions for {len(queries)} queries")
        return self._get(collection).search(np.asarray(queries, dtype=np.float32), k, parsed, exclude_keys)

    # -- maintenance ---------------------------------------------------------------------------------------------

    def _after_write(self, c: Collection) -> None:
        if c.needs_build():
            self._schedule(_Task(c.spec.name, "build"))
        if c.needs_snapshot():
            self._schedule(_Task(c.spec.name, "snapshot"))

    def _schedule(self, task: _Task) -> None:
        with self._lock:
            marker = (task.collection, task.kind)
            if marker in self._worker.pending or self._closed:
                return
            self._worker.pending.add(marker)
        self._worker.tasks.put(task)

    def _start_worker(self) -> None:
        self._worker.thread = threading.Thread(target=self._work, name="embedserve-index-maintenance", daemon=True)
        self._worker.thread.start()
        for name in list(self._collections):
            self._after_write(self._collections[name])

    def _work(self) -> None:
        while True:
            task = self._worker.tasks.get()
            try:
                if task is None:
                    return
                with self._lock:
                    self._worker.pending.discard((task.collection, task.kind))
                    collection = self._collections.get(task.collection)
                if collection is None:
                    continue
                if task.kind == "build":
                    if collection.build():
                        self._schedule(_Task(task.collection, "snapshot"))
                else:
                    collection.snapshot()
            except Exception:
                logger.exception("index maintenance (%s) failed; it will be retried after the next write", task)
            finally:
                self._worker.tasks.task_done()

    def wait_idle(self) -> None:
        """Block until the background builds and snapshots scheduled so far are done (tests, benchmarks)."""
        self._worker.tasks.join()

    def build_now(self, collection: str) -> bool:
        """Build the approximate index of `collection` in this thread if it needs one; True when built."""
        return self._get(collection).build()

    def snapshot(self, collection: str | None = None) -> None:
        """Snapshot one collection (or all) now, in this thread."""
        names = [collection] if collection is not None else sorted(self.counts())
        for name in names:
            self._get(name).snapshot()

    def close(self, *, snapshot: bool = True) -> None:
        """Stop background work, snapshot collections with unsaved log records (unless `snapshot=False`), close the
        logs and release the data directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._worker.tasks.put(None)
        if self._worker.thread is not None:
            self._worker.thread.join()
        for collection in list(self._collections.values()):
            try:
                if snapshot and collection.wal is not None and collection.wal.records:
                    collection.snapshot()
            except Exception:
                logger.exception("final snapshot of %s failed; its log still holds every write", collection.spec.name)
            collection.close()
        os.close(self._lock_fd)

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
