"""The directory job's files: Parquet output and part files, the failures CSV; every write atomic.

Rows are flushed as numbered part files in `OUT.parquet.parts/`; at the end the output and its parts are merged
into one file that replaces the output atomically, and only then are the parts removed. Every file goes through
`service.files.write_atomic` (temporary name, fsync, rename, fsync the directory), so a crash leaves whole files.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.errors import EmbedServeError
from service.files import write_atomic
from service.types import ModelInfo

_META_PREFIX = b"embedserve."


class JobError(EmbedServeError):
    """The job cannot start or continue (bad directory, output written by another model, ...)."""


class Row(Protocol):
    """What a part file records of one embedded image."""

    key: str
    path: Path
    label: str | None


def parts_dir(out: Path) -> Path:
    """Where the part files of `out` live while a run is in progress."""
    return out.with_name(out.name + ".parts")


def failures_file(out: Path) -> Path:
    """The CSV (key, reason, message) of the images of the last run that failed."""
    return out.with_name(out.name + ".failures.csv")


_PROVENANCE_KEYS = frozenset(
    {b"embedserve.version", b"embedserve.runtime", b"embedserve.precision", b"embedserve.device"}
)


def schema_for(info: ModelInfo) -> pa.Schema:
    """The Parquet schema of the job's output, with the model recorded in the metadata."""
    meta = {
        b"embedserve.model": info.backbone.encode(),
        b"embedserve.dim": str(info.embedding_dim).encode(),
        b"embedserve.resize": info.resize.encode(),
        b"embedserve.pad": info.pad.encode(),
        b"embedserve.version": info.version.encode(),
        b"embedserve.runtime": info.runtime.encode(),
        b"embedserve.precision": info.precision.encode(),
        b"embedserve.device": info.device.encode(),
    }
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=True),
            pa.field("embedding", pa.list_(pa.float32(), info.embedding_dim), nullable=False),
        ],
        metadata=meta,
    )


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` atomically (`service.files.write_atomic`)."""
    write_atomic(path, lambda handle: pq.write_table(table, handle))


def _check_compatible(path: Path, schema: pa.Schema) -> None:
    existing = pq.read_schema(path).metadata or {}
    for key, value in (schema.metadata or {}).items():
        # Version, runtime, precision and device are provenance: a resumed job may change them (bf16 and float32
        # embeddings agree to cosine >= 0.995), each part file records its own.
        if key in _PROVENANCE_KEYS or not key.startswith(_META_PREFIX):
            continue
        if existing.get(key) != value:
            theirs = existing.get(key, b"nothing").decode()
            raise JobError(
                f"{path} was written with {key.decode()}={theirs}, this run uses {value.decode()}; "
                "write to a different --out or run with the same settings"
            )


def existing_files(out: Path) -> list[Path]:
    """The output (if any) and its part files, in the order they were written."""
    files = [out] if out.exists() else []
    pdir = parts_dir(out)
    if pdir.is_dir():
        files.extend(sorted(p for p in pdir.glob("part-*.parquet")))
    return files


def done_keys(files: list[Path], schema: pa.Schema) -> set[str]:
    """Keys already embedded in `files`; raises `JobError` when one was written with other settings."""
    keys: set[str] = set()
    for path in files:
        _check_compatible(path, schema)
        keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return keys


class PartWriter:
    """Buffers rows and flushes them as numbered, atomically written part files."""

    def __init__(self, out: Path, schema: pa.Schema, dim: int) -> None:
        self.dir = parts_dir(out)
        self.schema = schema
        self.dim = dim
        self.keys: list[str] = []
        self.paths: list[str] = []
        self.labels: list[str | None] = []
        self.vectors: list[np.ndarray] = []
        existing = sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []
        self.next_index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.last_flush = time.monotonic()

    def add(self, item: Row, vector: np.ndarray) -> None:
        self.keys.append(item.key)
        self.paths.append(str(item.path))
        self.labels.append(item.label)
        self.vectors.append(vector)

    def __len__(self) -> int:
        return len(self.keys)

    def flush(self) -> None:
        """Write the buffered rows as the next part file (nothing when empty)."""
        self.last_flush = time.monotonic()
        if not self.keys:
            return
        flat = pa.array(np.stack(self.vectors).astype(np.float32, copy=False).ravel(), type=pa.float32())
        table = pa.Table.from_arrays(
            [
                pa.array(self.keys, pa.string()),
                pa.array(self.paths, pa.string()),
                pa.array(self.labels, pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, self.dim),
            ],
            schema=self.schema,
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(table, self.dir / f"part-{self.next_index:06d}.parquet")
        self.next_index += 1
        self.keys, self.paths, self.labels, self.vectors = [], [], [], []


def merge_parts(out: Path, schema: pa.Schema) -> None:
    """Fold the output and its parts into one file, atomically, then drop the parts."""
    pdir = parts_dir(out)
    files = existing_files(out)
    if files == [out] or not files:
        return
    tables = [pq.read_table(path, schema=schema) for path in files]
    merged = pa.concat_tables(tables).sort_by("key").replace_schema_metadata(schema.metadata)
    write_parquet_atomic(merged, out)
    for part in pdir.glob("part-*.parquet"):
        part.unlink()
    for leftover in pdir.glob("*.tmp"):
        leftover.unlink()
    pdir.rmdir()


def write_failures(path: Path, failures: list[tuple[str, str, str]]) -> None:
    """Write the failures CSV atomically, or remove it when nothing failed."""
    if not failures:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["key", "reason", "message"])
    writer.writerows(failures)
    text = buffer.getvalue().encode("utf-8")

    def write(handle: IO[Any]) -> None:
        handle.write(text)

    write_atomic(path, write)
