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
- `wal-<generation>.log`: the write-ahead log (`service.index.wal`) of records (`service.index.records`). An upsert
  or delete is appended and applied under the collection's lock, then fsync'd (group commit) before the call returns;
- `snapshot.npz` (`service.index.snapshot`): vectors, ids, keys, attributes and the built approximate index, written
  atomically. Taken after `snapshot_every_records` records or `snapshot_every_bytes` log bytes, and on `close()`;
  the log generations it covers are then deleted.
On open, the snapshot is loaded and the newer log generations replayed; a torn or corrupt tail of a log (from a
crash mid-write) is dropped with a warning. A `LOCK` file (flock) keeps two stores off one data directory.

The package: this module owns the data directory and the collections by name; `collection` one collection (lock,
writes, recovery); `rows` its items in memory; `search` the search plan; `backends` the exact and approximate
engines; `filter` the filter grammar.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from service.config import Config
from service.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DataDirLockedError,
    DurabilityError,
    InvalidIndexRequestError,
    KeyNotFoundError,
)
from service.files import fsync_dir
from service.index.backends import ExactSearcher, make_exact_searcher
from service.index.collection import SPEC_NAME, Collection, CollectionSpec, check_collection_name
from service.index.filter import Filter, parse_filter
from service.index.snapshot import SNAPSHOT_NAME
from service.types import CollectionInfo, FetchedItems, Neighbor

__all__ = [
    "DEFAULT_COLLECTION",
    "MAX_K",
    "CollectionInfo",
    "CollectionNotFoundError",
    "CollectionSpec",
    "FetchedItems",
    "IndexStore",
    "KeyNotFoundError",
    "Neighbor",
    "check_collection_name",
]

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "default"
MAX_K = 10_000


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
            if not path.is_dir() or not (path / SPEC_NAME).exists():
                logger.warning("ignoring %s: not a collection directory", path)
                continue
            spec = CollectionSpec.read(path)
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
            spec.write(staging)
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
        """Whether a collection of this name exists."""
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
        """Settings, size and search backend of one collection."""
        return self._get(collection).info()

    def counts(self) -> dict[str, int]:
        """Items per collection (cheap; for metrics)."""
        with self._lock:
            return {name: c.count for name, c in self._collections.items()}

    def log_stats(self) -> dict[str, tuple[int, float | None]]:
        """Per collection: bytes of its write-ahead log since the last snapshot, and that snapshot's modification
        time (`time.time()` scale; None before the first). Cheap; for metrics."""
        with self._lock:
            collections = list(self._collections.items())
        stats: dict[str, tuple[int, float | None]] = {}
        for name, c in collections:
            wal = c.wal
            try:
                snapshot_at: float | None = (c.directory / SNAPSHOT_NAME).stat().st_mtime
            except OSError:  # none written yet (or the collection was just dropped)
                snapshot_at = None
            stats[name] = (wal.bytes if wal is not None else 0, snapshot_at)
        return stats

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
        """Items in one collection."""
        return self._get(collection).count

    def keys(self, collection: str) -> list[str]:
        """Every key of a collection, sorted."""
        c = self._get(collection)
        return c.sorted_keys()

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems:
        """Stored items of `collection`: those with `keys` in that order, or all of them sorted by key when None.

        Raises `CollectionNotFoundError` for an unknown collection and `KeyNotFoundError` when a key is missing.
        """
        return self._get(collection).fetch(keys)

    def fetch_vectors(self, collection: str, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The stored vector of each key, or None where the collection has no such key."""
        return self._get(collection).fetch_vectors(keys)

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
                if snapshot and collection.has_unsaved_records():
                    collection.snapshot()
            except Exception:
                logger.exception("final snapshot of %s failed; its log still holds every write", collection.spec.name)
            collection.close()
        os.close(self._lock_fd)

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
