"""Directory jobs: walk a tree of images, embed them, write Parquet, resumably.

Output (`--out FILE.parquet`), one row per embedded image:
- `key` (string): the path relative to the directory, with `/` separators;
- `path` (string): the absolute path of the file;
- `label` (string, nullable): the name of the file's parent folder (e.g. `CNV`), null for files at the
  top of the directory or with `labels=False`;
- `embedding` (fixed-size list of float32): the L2-normalised embedding.
The file's schema metadata records the model, dimension, resize policy and embedserve version.

Crash safety: rows are flushed every `part_rows` images (or `part_seconds`) as part files in
`FILE.parquet.parts/`, each written to a temporary name, fsync'd and renamed. When the walk ends, the
existing output and the parts are merged into a temporary file that replaces the output atomically;
only then are the parts removed. An interrupted or killed run therefore leaves the old output intact
plus complete parts, and re-running the same command skips every key already in either.
Images that failed are listed in `FILE.parquet.failures.csv` (key, reason, message); they are retried
on the next run.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from service.errors import EmbedServeError, UnreadableImageError
from service.types import Embedded, ModelInfo

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_META_PREFIX = b"embedserve."


class Embedder(Protocol):
    """What the job needs: the local `Engine`, or a client of a remote server."""

    @property
    def info(self) -> ModelInfo: ...

    def embed_iter(self, items: Iterable[FileItem]) -> Iterator[Embedded[FileItem]]: ...


class JobError(EmbedServeError):
    """The job cannot start or continue (bad directory, output written by another model, ...)."""


@dataclass(frozen=True, kw_only=True)
class EmbedJobOptions:
    """What the directory job does."""

    root: Path
    """Directory to walk recursively."""
    out: Path
    """Parquet file to write (and to resume)."""
    labels: bool = True
    """Fill `label` with the parent folder's name."""
    progress: bool = True
    """Show a progress bar (only drawn on a terminal)."""
    part_rows: int = 2048
    """Flush a part file after this many rows..."""
    part_seconds: float = 60.0
    """...or after this many seconds, whichever comes first."""


@dataclass(slots=True)
class JobSummary:
    """What a job did."""

    found: int = 0
    already_done: int = 0
    embedded: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    out: Path | None = None
    failures_path: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class FileItem:
    """One image file of the walk."""

    key: str
    path: Path
    label: str | None

    def load(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise UnreadableImageError(f"cannot read {self.key}: {e.strerror or e}") from e


def find_images(root: Path, *, labels: bool = True) -> list[FileItem]:
    """Image files under `root` (extensions case-insensitive), sorted by key, skipping hidden entries."""
    return sorted(_walk(root, labels), key=lambda item: item.key)


def _walk(root: Path, labels: bool) -> Iterator[FileItem]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = base / name
            rel = path.relative_to(root)
            label = rel.parent.name if labels and rel.parent != Path(".") else None
            yield FileItem(key=rel.as_posix(), path=path.resolve(), label=label)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def failures_file(out: Path) -> Path:
    return out.with_name(out.name + ".failures.csv")


def schema_for(info: ModelInfo) -> pa.Schema:
    """The Parquet schema of the job's output, with the model recorded in the metadata."""
    meta = {
        b"embedserve.model": info.backbone.encode(),
        b"embedserve.dim": str(info.embedding_dim).encode(),
        b"embedserve.resize": info.resize.encode(),
        b"embedserve.pad": info.pad.encode(),
        b"embedserve.version": info.version.encode(),
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to `path.tmp`, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_compatible(path: Path, schema: pa.Schema) -> None:
    existing = pq.read_schema(path).metadata or {}
    for key, value in (schema.metadata or {}).items():
        if key == b"embedserve.version" or not key.startswith(_META_PREFIX):
            continue
        if existing.get(key) != value:
            theirs = existing.get(key, b"nothing").decode()
            raise JobError(
                f"{path} was written with {key.decode()}={theirs}, this run uses {value.decode()}; "
                "write to a different --out or run with the same settings"
            )


def _existing_files(out: Path) -> list[Path]:
    files = [out] if out.exists() else []
    pdir = parts_dir(out)
    if pdir.is_dir():
        files.extend(sorted(p for p in pdir.glob("part-*.parquet")))
    return files


def _done_keys(files: list[Path], schema: pa.Schema) -> set[str]:
    keys: set[str] = set()
    for path in files:
        _check_compatible(path, schema)
        keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return keys


class _PartWriter:
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

    def add(self, item: FileItem, vector: np.ndarray) -> None:
        self.keys.append(item.key)
        self.paths.append(str(item.path))
        self.labels.append(item.label)
        self.vectors.append(vector)

    def __len__(self) -> int:
        return len(self.keys)

    def flush(self) -> None:
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


def _merge(out: Path, schema: pa.Schema) -> None:
    """Fold the output and its parts into one file, atomically, then drop the parts."""
    pdir = parts_dir(out)
    files = _existing_files(out)
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


def _write_failures(path: Path, failures: list[tuple[str, str, str]]) -> None:
    if not failures:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["key", "reason", "message"])
    writer.writerows(failures)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def run_embed_job(engine: Embedder, options: EmbedJobOptions) -> JobSummary:
    """Embed every image under `options.root` not yet in `options.out`; see the module docstring.

    A `KeyboardInterrupt` flushes what was embedded so far and propagates; re-running resumes.
    """
    root, out = options.root, options.out
    if not root.is_dir():
        raise JobError(f"{root} is not a directory; pass the directory that holds the images")
    if out.suffix.lower() != ".parquet":
        raise JobError(f"--out {out} should end in .parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    schema = schema_for(engine.info)
    done = _done_keys(_existing_files(out), schema)
    items = find_images(root, labels=options.labels)
    todo = [item for item in items if item.key not in done]
    summary = JobSummary(found=len(items), already_done=len(items) - len(todo), out=out)
    logger.info(
        "%d images under %s, %d already in %s, %d to embed", len(items), root, summary.already_done, out, len(todo)
    )
    writer = _PartWriter(out, schema, engine.info.embedding_dim)
    bar = tqdm(total=len(todo), unit="img", disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    try:
        for result in engine.embed_iter(todo):
            if result.outcome.vector is not None:
                writer.add(result.item, result.outcome.vector)
                summary.embedded += 1
            elif result.outcome.error is not None:
                error = result.outcome.error
                summary.failed += 1
                summary.failures.append((result.item.key, error.reason, error.message))
                logger.debug("failed: %s: %s", result.item.key, error.message)
                bar.set_postfix(failed=summary.failed, refresh=False)
            bar.update(1)
            if len(writer) >= options.part_rows or time.monotonic() - writer.last_flush >= options.part_seconds:
                writer.flush()
    finally:
        # Interrupted or not, what was embedded is kept: the next run resumes after it.
        writer.flush()
        bar.close()
        summary.failures_path = failures_file(out)
        _write_failures(summary.failures_path, summary.failures)
        summary.seconds = time.monotonic() - start
    _merge(out, schema)
    if not out.exists():
        write_parquet_atomic(schema.empty_table(), out)
    return summary
