"""One collection: its spec, its rows in memory, its log and snapshot, and the lock that orders them.

A write is encoded as a log record (`service.index.records`), appended to the log (`service.index.wal`) and applied
to the rows (`service.index.rows`) under the collection's lock, so the log order is the apply order; it is then
fsync'd (group commit) before the call returns. Recovery is the same path: load the snapshot
(`service.index.snapshot`), then decode and apply the log records after it. Searches are planned by
`service.index.search`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.config import IndexConfig
from service.errors import CollectionNotFoundError, DurabilityError, InvalidIndexRequestError, KeyNotFoundError
from service.files import fsync_dir, write_atomic
from service.index import records
from service.index.backends import AnnParams, ExactSearcher, SearchMetric, build_ann
from service.index.filter import Filter
from service.index.rows import RowStore
from service.index.search import search_rows
from service.index.snapshot import SNAPSHOT_NAME, Snapshot, read_snapshot, remove_partial, write_snapshot
from service.index.wal import WriteAheadLog, generations, log_path, replay
from service.types import CollectionInfo, FetchedItems, Neighbor

logger = logging.getLogger(__name__)

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Allowed collection names (also directory names and metric label values)."""
SPEC_NAME = "collection.json"
MAX_KEY_BYTES = 4096
INDEX_TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")
METRICS = ("cosine", "l2")
_UNIT_TOLERANCE = 1e-5
"""Cosine vectors whose norm is this close to 1 are stored as given (bit-identical to what the caller sent)."""
_FLOAT32_SAFE_NORM = 1e-18
"""Below this float32 norm, squares of the components may have underflowed: the norm is taken again in float64."""
_L2_MAX_NORM = 1e18
"""Largest vector norm an l2 collection takes: squared distances of such vectors still fit in float32 (3.4e38)."""


@dataclass(frozen=True, kw_only=True, slots=True)
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
        """The metric exact search computes: inner product for cosine (unit vectors), else squared L2."""
        return "ip" if self.metric == "cosine" else "l2"

    def ann_params(self) -> AnnParams:
        """How this collection's approximate index is built."""
        return AnnParams(
            index_type=self.index_type,
            dim=self.dim,
            nlist=self.nlist,
            pq_m=self.pq_m,
            pq_nbits=self.pq_nbits,
            hnsw_m=self.hnsw_m,
            ef_construction=self.ef_construction,
        )

    @classmethod
    def read(cls, directory: Path) -> CollectionSpec:
        """The spec stored in `directory/collection.json`."""
        return cls(**json.loads((directory / SPEC_NAME).read_text()))

    def write(self, directory: Path) -> None:
        """Store this spec in `directory/collection.json`, atomically and durably."""
        text = json.dumps(asdict(self), indent=1).encode()

        def write(handle: IO[Any]) -> None:
            handle.write(text)

        write_atomic(directory / SPEC_NAME, write)

    def validate(self) -> None:
        """Raise `InvalidIndexRequestError` (saying what to change) for settings no collection can have."""
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
    """Raise `InvalidIndexRequestError` unless `name` may name a collection."""
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


class Collection:
    """One collection in memory plus its log. Use it through `IndexStore`; every method is thread-safe."""

    def __init__(self, spec: CollectionSpec, directory: Path, cfg: IndexConfig, searcher: ExactSearcher) -> None:
        self.spec = spec
        self.directory = directory
        self.cfg = cfg
        self.searcher = searcher
        self.lock = threading.RLock()
        self.snapshot_lock = threading.Lock()
        self.rows = RowStore(spec.dim)
        self.ann: Any = None
        self.building = False
        self.dropped = False
        self.wal: WriteAheadLog | None = None
        self.cache_key = f"{spec.name}:{uuid.uuid4().hex}"

    @property
    def count(self) -> int:
        """Live items (read without the lock: a snapshot of an int)."""
        return self.rows.count

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self, on_sync: Callable[[float, int], None] | None) -> None:
        """Load the snapshot, replay the log after it, and open the log for appends."""
        first_generation = 1
        remove_partial(self.directory)
        path = self.directory / SNAPSHOT_NAME
        if path.exists():
            saved = read_snapshot(path, self.spec.dim)
            self.rows = saved.restore_rows()
            self.ann = saved.restore_ann()
            first_generation = saved.generation
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
            self.rows.count,
            replayed,
            current,
        )

    # -- mutation ------------------------------------------------------------------------------------------------

    def prepare_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Validate (shape, finite) and, for cosine, normalise vectors that are not unit length already."""
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.spec.dim:
            raise InvalidIndexRequestError(
                f"collection {self.spec.name!r} holds {self.spec.dim}-d vectors; got shape {tuple(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise InvalidIndexRequestError("vectors must be finite (no NaN or infinity)")
        if not len(array):
            return np.ascontiguousarray(array)
        # In float32 the sum of squares of 1e20s overflows to inf and that of 1e-30s underflows to 0: such rows take
        # float64 norms, where every finite, non-zero float32 row has a finite, non-zero norm. The other rows keep the
        # float32 arithmetic, so that what is stored stays bit-identical to what earlier versions stored.
        with np.errstate(over="ignore", under="ignore"):
            norms = np.linalg.norm(array, axis=1)
        extreme = ~np.isfinite(norms) | (norms < _FLOAT32_SAFE_NORM)
        wide = np.linalg.norm(array[extreme].astype(np.float64), axis=1)
        if not np.isfinite(wide).all():
            raise InvalidIndexRequestError("a vector's norm is not finite; scale the vectors down")
        if self.spec.metric == "cosine":
            if (wide == 0).any():
                raise InvalidIndexRequestError(
                    "a zero vector has no direction; it cannot be stored or searched by cosine"
                )
            off = np.abs(norms - 1.0) > _UNIT_TOLERANCE
            if off.any():
                array = array.copy()
                array[off & ~extreme] /= norms[off & ~extreme, None]
                array[extreme] = (array[extreme].astype(np.float64) / wide[:, None]).astype(np.float32)
        elif (norms > _L2_MAX_NORM).any():
            raise InvalidIndexRequestError(
                f"a vector's norm exceeds {_L2_MAX_NORM:.0e}: l2 distances would overflow float32; scale the vectors"
            )
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
        return self._write(records.encode_upsert(keys, prepared, attrs))

    def delete(self, keys: Sequence[str]) -> int:
        """Delete the items with these keys (unknown keys are ignored); returns how many existed. Durable on return."""
        if not keys:
            return 0
        return self._write(records.encode_delete(keys))

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
        try:
            record = records.decode(payload, self.spec.dim)
        except records.CorruptRecordError as e:
            raise records.CorruptRecordError(f"collection {self.spec.name!r}: {e}") from e
        if isinstance(record, records.DeleteRecord):
            return self.rows.delete(record.keys)
        new_ids = self.rows.upsert(record.keys, record.vectors, record.attributes)
        if self.ann is not None:
            self.ann.add_with_ids(np.ascontiguousarray(record.vectors), new_ids)
        return len(record.keys)

    # -- reading -------------------------------------------------------------------------------------------------

    def fetch(self, keys: Sequence[str] | None) -> FetchedItems:
        """Stored items: those with `keys` in that order, or all of them sorted by key when None."""
        with self.lock:
            self._check_open()
            rows = self.rows
            if keys is None:
                found = sorted(range(rows.count), key=rows.keys.__getitem__)
            else:
                missing = [key for key in keys if key not in rows.row_of_key]
                if missing:
                    shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
                    raise KeyNotFoundError(
                        f"collection {self.spec.name!r} has no item with key {shown} ({len(missing)} missing)"
                    )
                found = [rows.row_of_key[key] for key in keys]
            index = np.asarray(found, dtype=np.int64)
            return FetchedItems(
                keys=[rows.keys[r] for r in found],
                vectors=rows.vectors[index].copy() if len(index) else np.zeros((0, self.spec.dim), np.float32),
                attributes=[dict(rows.attributes[r]) for r in found],
            )

    def fetch_vectors(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The stored vector of each key, or None where there is no such key."""
        with self.lock:
            self._check_open()
            found = [self.rows.row_of_key.get(key) for key in keys]
            return [None if row is None else self.rows.vectors[row].copy() for row in found]

    def sorted_keys(self) -> list[str]:
        """Every key, sorted."""
        with self.lock:
            return sorted(self.rows.keys)

    def search(
        self, queries: np.ndarray, k: int, flt: Filter | None, exclude: Sequence[str | None] | None
    ) -> list[list[Neighbor]]:
        """The k nearest items to each query, best first, among those matching `flt`, without `exclude[i]`."""
        prepared = self.prepare_vectors(queries)
        with self.lock:
            self._check_open()
            return search_rows(
                self.rows,
                prepared,
                k,
                metric=self.spec.search_metric,
                searcher=self.searcher,
                cfg=self.cfg,
                ann=self.ann,
                flt=flt,
                exclude=exclude,
                cache_key=self.cache_key,
            )

    # -- maintenance ---------------------------------------------------------------------------------------------

    def needs_build(self) -> bool:
        """An approximate index should be (re)built: enough items and none yet, or too many dead ids in it."""
        if self.spec.index_type == "flat" or self.building or self.dropped:
            return False
        if self.ann is None:
            return self.rows.count >= self.cfg.train_min_vectors
        return int(self.ann.ntotal) > 2 * self.rows.count + 1000

    def needs_snapshot(self) -> bool:
        """Enough log records or bytes have accumulated since the last snapshot."""
        wal = self.wal
        if wal is None or self.dropped:
            return False
        return wal.records >= self.cfg.snapshot_every_records or wal.bytes >= self.cfg.snapshot_every_bytes

    def has_unsaved_records(self) -> bool:
        """The log holds records that no snapshot covers yet."""
        wal = self.wal
        return wal is not None and wal.records > 0

    def build(self) -> bool:
        """Build the approximate index from the live items (off the lock), then catch up and install it."""
        with self.lock:
            if not self.needs_build():
                return False
            self.building = True
            n = self.rows.count
            vectors, ids = self.rows.live_vectors.copy(), self.rows.live_ids.copy()
            first_new_id = self.rows.next_id
        try:
            started = time.monotonic()
            index = build_ann(self.spec.ann_params(), vectors, ids)
            with self.lock:
                if self.dropped:
                    return False
                live_ids = self.rows.live_ids
                newer = live_ids >= first_new_id
                if newer.any():
                    index.add_with_ids(np.ascontiguousarray(self.rows.live_vectors[newer]), live_ids[newer])
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
                if self.wal.records == 0 and (self.directory / SNAPSHOT_NAME).exists():
                    return False
                try:
                    generation = self.wal.rotate()
                except OSError as e:
                    raise DurabilityError(f"could not rotate the log of {self.spec.name!r}: {e.strerror or e}") from e
                state = Snapshot.capture(self.rows, self.ann, generation)
            started = time.monotonic()
            write_snapshot(self.directory / SNAPSHOT_NAME, state, asdict(self.spec))
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

    def info(self) -> CollectionInfo:
        """Settings, size and search backend of this collection."""
        with self.lock:
            self._check_open()
            trained = self.spec.index_type == "flat" or self.ann is not None
            backend = self.spec.index_type if self.ann is not None else self.searcher.name
            count = self.rows.count
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
        """fsync and close the log; forget device copies of the rows."""
        with self.lock:
            if self.wal is not None:
                self.wal.close()
                self.wal = None
        self.searcher.evict(self.cache_key)
