"""A write-ahead log with checksummed records, group commit and rotation by generation.

One log is a directory of files `wal-<generation>.log`. Each file starts with the 8-byte magic `ESWAL001`,
followed by records:

    length  u32 little-endian   bytes of the payload
    crc32   u32 little-endian   zlib.crc32 of the payload
    payload `length` bytes

`append()` writes a record with one `os.write` (the bytes reach the OS at once, so a killed process loses
nothing written), and `sync(seq)` returns once that record is on stable storage. Syncs are group commits:
while one thread fsyncs, others append, and the next fsync covers all of them, so concurrent writers share
fsyncs instead of queueing one each.

`rotate()` starts a new generation; a snapshot of everything before it lets the older files be deleted.
`read_generation()` reads one file back, stopping at the first torn or corrupt record (short header, length past
the end, checksum mismatch): that record and anything after it were never acknowledged, so they are dropped with a
warning and the file is cut back to its last good record.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.files import fsync_dir

logger = logging.getLogger(__name__)

MAGIC = b"ESWAL001"
_HEADER = struct.Struct("<II")
_NAME = re.compile(r"^wal-(\d{8})\.log$")
MAX_RECORD_BYTES = 1 << 31
"""Larger payloads are refused (a length beyond this in a file is treated as corruption)."""


def log_path(directory: Path, generation: int) -> Path:
    return directory / f"wal-{generation:08d}.log"


def generations(directory: Path) -> list[int]:
    """The generations of the log files in `directory`, ascending."""
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def encode_record(payload: bytes) -> bytes:
    if len(payload) >= MAX_RECORD_BYTES:
        raise ValueError(f"a log record of {len(payload)} bytes is too large; write smaller batches")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class ReadResult:
    """The good records of one log file, where they end, and what was wrong after them (None = nothing)."""

    records: list[bytes]
    valid_bytes: int
    problem: str | None


def read_generation(path: Path) -> ReadResult:
    """The intact records of one log file, up to the first torn or corrupt one."""
    data = path.read_bytes()
    if len(data) < len(MAGIC):
        return ReadResult([], 0, f"file header torn ({len(data)} bytes)" if data else None)
    if data[: len(MAGIC)] != MAGIC:
        return ReadResult([], 0, "not an embedserve log (bad magic)")
    records: list[bytes] = []
    offset = len(MAGIC)
    problem = None
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            problem = f"torn record header at byte {offset}"
            break
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if start + length > len(data):
            problem = f"torn record at byte {offset}: {length} bytes announced, {len(data) - start} present"
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            problem = f"checksum mismatch in the record at byte {offset}"
            break
        records.append(payload)
        offset = start + length
    return ReadResult(records, offset, problem)


def repair(path: Path, result: ReadResult) -> None:
    """Cut a log file back to its last good record (rewriting the header of an empty one), durably."""
    logger.warning(
        "write-ahead log %s: %s; dropping the %d bytes after the last good record (never acknowledged)",
        path,
        result.problem,
        path.stat().st_size - result.valid_bytes,
    )
    with path.open("r+b") as handle:
        if result.valid_bytes < len(MAGIC):
            handle.seek(0)
            handle.write(MAGIC)
            handle.truncate(len(MAGIC))
        else:
            handle.truncate(result.valid_bytes)
        handle.flush()
        os.fsync(handle.fileno())


class WriteAheadLog:
    """The append side of a log directory: `append` then `sync`, `rotate`, `close`. Thread-safe.

    `on_sync(seconds, records)` is called after each fsync with its duration and how many records it made durable.
    """

    def __init__(
        self,
        directory: Path,
        generation: int,
        *,
        fsync: bool = True,
        on_sync: Callable[[float, int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.on_sync = on_sync
        self._cond = threading.Condition()
        self._syncing = False
        self._written = 0
        """Sequence number of the last appended record."""
        self._durable = 0
        """Sequence number of the last record known to be on stable storage."""
        self.records = 0
        """Records in the current generation."""
        self.bytes = 0
        """Bytes in the current generation."""
        self.generation = generation
        self._fd = self._open(generation)

    def _open(self, generation: int) -> int:
        path = log_path(self.directory, generation)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size == 0:
            os.write(fd, MAGIC)
            os.fsync(fd)
            size = len(MAGIC)
        if not existed:
            fsync_dir(self.directory)
        self.bytes = size
        self.records = 0
        return fd

    def append(self, payload: bytes) -> int:
        """Write one record (not yet durable); returns its sequence number for `sync`."""
        record = encode_record(payload)
        with self._cond:
            if self._fd < 0:
                raise OSError("the write-ahead log is closed")
            written = 0
            while written < len(record):
                written += os.write(self._fd, record[written:])
            self._written += 1
            self.records += 1
            self.bytes += len(record)
            return self._written

    def sync(self, seq: int) -> None:
        """Return once record `seq` (and every one before it) is on stable storage."""
        with self._cond:
            while True:
                if self._durable >= seq:
                    return
                if not self._syncing:
                    break
                self._cond.wait()
            # Become the leader: one fsync for everything appended so far, by any thread.
            self._syncing = True
            target, fd, before = self._written, self._fd, self._durable
        started = time.perf_counter()
        done = False
        try:
            if self.fsync:
                os.fsync(fd)
            done = True
        finally:
            with self._cond:
                self._syncing = False
                if done:
                    self._durable = max(self._durable, target)
                self._cond.notify_all()
        if self.on_sync is not None and self.fsync:
            self.on_sync(time.perf_counter() - started, target - before)

    def rotate(self) -> int:
        """Make everything written durable, close this generation and start the next; returns the new generation."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self.fsync:
                os.fsync(self._fd)
            self._durable = self._written
            os.close(self._fd)
            self.generation += 1
            self._fd = self._open(self.generation)
            self._cond.notify_all()
            return self.generation

    def close(self) -> None:
        """fsync what was written and close the file."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd < 0:
                return
            if self.fsync:
                os.fsync(self._fd)
            self._durable = self._written
            os.close(self._fd)
            self._fd = -1
            self._cond.notify_all()


def replay(directory: Path, first_generation: int) -> Iterator[tuple[int, bytes]]:
    """(generation, payload) of every intact record in generations >= `first_generation`, in order.

    Torn or corrupt tails are cut off the files (with a warning) as they are read, so that appends continue from
    the last good record.
    """
    for generation in generations(directory):
        if generation < first_generation:
            continue
        path = log_path(directory, generation)
        result = read_generation(path)
        if result.problem is not None:
            repair(path, result)
        for payload in result.records:
            yield generation, payload
