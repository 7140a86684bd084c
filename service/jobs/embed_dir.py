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

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from service.errors import UnreadableImageError
from service.jobs.attributes import AttributeRules
from service.jobs.files import (
    JobError,
    PartWriter,
    done_keys,
    existing_files,
    failures_file,
    merge_parts,
    parts_dir,
    schema_for,
    write_failures,
    write_parquet_atomic,
)
from service.jobs.progress import make_progress
from service.types import Embedded, ModelInfo

__all__ = [  # the job's files are defined in service.jobs.files; these names stay importable from here
    "IMAGE_EXTENSIONS",
    "EmbedJobOptions",
    "Embedder",
    "FileItem",
    "JobError",
    "JobSummary",
    "failures_file",
    "find_images",
    "parts_dir",
    "run_embed_job",
    "schema_for",
    "write_parquet_atomic",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class Embedder(Protocol):
    """What the job needs: the local `Engine`, or a client of a remote server."""

    @property
    def info(self) -> ModelInfo: ...

    def embed_iter(self, items: Iterable[FileItem]) -> Iterator[Embedded[FileItem]]: ...


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
    """Show progress: a bar on a terminal, else a plain line every `progress_seconds`."""
    progress_seconds: float = 10.0
    """Seconds between the plain progress lines written when stderr is not a terminal."""
    attributes: AttributeRules | None = None
    """Extra attributes for each image, from its key (stored with `--store`)."""
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
    attributes: dict[str, str] = field(default_factory=dict)
    """Extra attributes to store with the vector (`--attr`, `--attributes`); not written to the Parquet file."""

    def load(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise UnreadableImageError(f"cannot read {self.key}: {e.strerror or e}") from e


def find_images(root: Path, *, labels: bool = True, attributes: AttributeRules | None = None) -> list[FileItem]:
    """Image files under `root` (extensions case-insensitive), sorted by key, skipping hidden entries; each with
    the extra attributes `attributes` gives its key."""
    items = sorted(_walk(root, labels), key=lambda item: item.key)
    if attributes:
        for item in items:
            item.attributes = attributes.for_key(item.key)
    return items


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
    done = done_keys(existing_files(out), schema)
    items = find_images(root, labels=options.labels, attributes=options.attributes)
    todo = [item for item in items if item.key not in done]
    summary = JobSummary(found=len(items), already_done=len(items) - len(todo), out=out)
    logger.info(
        "%d images under %s, %d already in %s, %d to embed", len(items), root, summary.already_done, out, len(todo)
    )
    writer = PartWriter(out, schema, engine.info.embedding_dim)
    bar = make_progress(len(todo), enabled=options.progress, every=options.progress_seconds)
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
        write_failures(summary.failures_path, summary.failures)
        summary.seconds = time.monotonic() - start
    merge_parts(out, schema)
    if not out.exists():
        write_parquet_atomic(schema.empty_table(), out)
    return summary
