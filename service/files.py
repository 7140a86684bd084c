"""Durable file writes, one copy for the whole service: fsync a directory; write a file atomically.

An atomic write goes to `name.tmp`, is fsync'd, `os.replace`d over `name`, and the directory is fsync'd, so a crash
leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that renames, creations and deletions in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[Any]], None]) -> None:
    """Write through `write(handle)` to `path.tmp`, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
