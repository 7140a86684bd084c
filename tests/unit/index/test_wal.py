"""The write-ahead log on its own: framing against struct + zlib, torn tails, checksum mismatches, rotation and
generations, group commit."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from service.index import wal
from service.index.store import IndexStore
from tests.unit.index.reference import make_cfg


def frame(payload: bytes) -> bytes:
    """The record layout of the module docstring, written independently."""
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def write_log(directory: Path, payloads: list[bytes], generation: int = 1) -> Path:
    log = wal.WriteAheadLog(directory, generation)
    for payload in payloads:
        log.sync(log.append(payload))
    log.close()
    return wal.log_path(directory, generation)


PAYLOADS = [b"first", b"", b"\x00\xff" * 100, "ünïcödé".encode()]


def test_records_are_framed_as_documented_and_read_back(tmp_path: Path) -> None:
    path = write_log(tmp_path, PAYLOADS)
    assert path.name == "wal-00000001.log"
    assert path.read_bytes() == wal.MAGIC + b"".join(frame(p) for p in PAYLOADS)
    result = wal.read_generation(path)
    assert result.records == PAYLOADS and result.problem is None and result.valid_bytes == path.stat().st_size
    assert list(wal.replay(tmp_path, 1)) == [(1, p) for p in PAYLOADS]


@pytest.mark.parametrize("cut", [1, 5, 8, 9])
def test_a_torn_tail_is_dropped_and_the_file_cut_back(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(tmp_path, [b"keep-1", b"keep-2", b"torn-record"])
    good = len(wal.MAGIC) + len(frame(b"keep-1")) + len(frame(b"keep-2"))
    path.write_bytes(path.read_bytes()[: good + cut])  # 1..7: inside the header; 8+: inside the payload
    result = wal.read_generation(path)
    assert result.records == [b"keep-1", b"keep-2"] and result.valid_bytes == good
    assert result.problem is not None and "torn record" in result.problem
    with caplog.at_level(logging.WARNING, logger="service.index.wal"):
        assert [p for _, p in wal.replay(tmp_path, 1)] == [b"keep-1", b"keep-2"]
    assert "torn record" in caplog.text and "dropping" in caplog.text
    assert path.stat().st_size == good  # repaired: appends continue after the last good record
    log = wal.WriteAheadLog(tmp_path, 1)
    log.sync(log.append(b"after"))
    log.close()
    assert wal.read_generation(path) == wal.ReadResult(
        [b"keep-1", b"keep-2", b"after"], good + len(frame(b"after")), None
    )


def test_a_checksum_mismatch_ends_the_good_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_log(tmp_path, [b"good", b"flipped", b"after-the-flip"])
    data = bytearray(path.read_bytes())
    flipped_at = len(wal.MAGIC) + len(frame(b"good"))
    data[flipped_at + 8] ^= 0x01  # first payload byte of the second record
    path.write_bytes(bytes(data))
    result = wal.read_generation(path)
    assert result.records == [b"good"] and result.valid_bytes == flipped_at
    assert result.problem == f"checksum mismatch in the record at byte {flipped_at}"
    with caplog.at_level(logging.WARNING, logger="service.index.wal"):
        assert [p for _, p in wal.replay(tmp_path, 1)] == [b"good"]
    assert "checksum mismatch" in caplog.text
    assert path.read_bytes() == wal.MAGIC + frame(b"good")


def test_bad_magic_torn_magic_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "wal-00000001.log"
    path.write_bytes(b"NOTALOG!" + frame(b"x"))
    assert wal.read_generation(path) == wal.ReadResult([], 0, "not an embedserve log (bad magic)")
    path.write_bytes(wal.MAGIC[:3])
    assert wal.read_generation(path) == wal.ReadResult([], 0, "file header torn (3 bytes)")
    path.write_bytes(b"")
    assert wal.read_generation(path) == wal.ReadResult([], 0, None)
    path.write_bytes(wal.MAGIC[:3])
    assert list(wal.replay(tmp_path, 1)) == []
    assert path.read_bytes() == wal.MAGIC  # a torn header is rewritten


def test_rotation_starts_a_new_generation(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, 1)
    log.sync(log.append(b"g1-a"))
    log.sync(log.append(b"g1-b"))
    assert log.records == 2 and log.bytes == len(wal.MAGIC) + len(frame(b"g1-a")) + len(frame(b"g1-b"))
    assert log.rotate() == 2 and log.generation == 2
    assert log.records == 0 and log.bytes == len(wal.MAGIC)
    log.sync(log.append(b"g2-a"))
    assert log.rotate() == 3
    log.close()
    (tmp_path / "not-a-log.txt").write_text("ignored")
    (tmp_path / "wal-1.log").write_text("ignored: the generation has 8 digits")
    assert wal.generations(tmp_path) == [1, 2, 3]
    assert list(wal.replay(tmp_path, 1)) == [(1, b"g1-a"), (1, b"g1-b"), (2, b"g2-a")]
    assert list(wal.replay(tmp_path, 2)) == [(2, b"g2-a")]  # generations a snapshot covers are skipped
    assert wal.log_path(tmp_path, 3).read_bytes() == wal.MAGIC
    log = wal.WriteAheadLog(tmp_path, 3)  # reopening an existing generation appends to it
    log.sync(log.append(b"g3-a"))
    log.close()
    assert list(wal.replay(tmp_path, 3)) == [(3, b"g3-a")]


def test_a_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = wal.WriteAheadLog(tmp_path, 1)
    log.close()
    log.close()  # idempotent
    with pytest.raises(OSError, match="closed"):
        log.append(b"late")


def test_group_commit_shares_fsyncs_between_concurrent_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a disk with a 20 ms flush, so that writers pile up behind it
        time.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(wal.os, "fsync", slow_fsync)
    syncs: list[int] = []
    cfg = make_cfg(tmp_path)
    store = IndexStore.open(cfg, on_fsync=lambda seconds, records: syncs.append(records))
    store.create_collection("c", dim=4)
    threads, per_thread = 8, 6

    def writer(t: int) -> None:
        for i in range(per_thread):
            store.upsert("c", [f"{t}-{i}"], np.ones((1, 4), np.float32))

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writes = threads * per_thread
    assert sum(syncs) == writes  # every record was covered by an fsync before its upsert returned
    assert len(syncs) <= writes // 2, syncs  # ...but far fewer fsyncs than writes
    assert store.count("c") == writes
    store.close()
