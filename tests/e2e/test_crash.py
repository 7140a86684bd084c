"""Crash safety: a real server storing a stream of batches is killed with SIGKILL at random moments, several times.

After every restart each acknowledged key is present with the identical vector and each acknowledged delete stays
deleted; finally the server starts cleanly from a log whose last record was torn (truncated by a few bytes).
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.client import EmbedClient, RemoteError
from service.index import wal

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 3
CONFIG = """
data_dir = "{data_dir}"

[engine]
batch_size = 8
prefetch_batches = 1

[decode]
workers = 2

[batcher]
max_batch_size = 8
max_queue_delay_ms = 5.0
max_queue_size = 64

[server]
port = 0
metrics_port = -1
grace_seconds = 5.0

[index]
snapshot_every_records = {snapshot_every}
"""
SERVE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
    "from service.config import load_config\n"
    "from service.api.server import run_server\n"
    "sys.exit(run_server(load_config(sys.argv[1])))\n"
)


def tiny_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8).repeat(6, axis=0).repeat(6, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class ServerProcess:
    """`run_server` in a child process; its log lines are collected by a thread."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
        env.update(PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        port = self.wait_for(r"listening on [^:]+:(\d+)", 120).group(1)
        self.target = f"127.0.0.1:{port}"
        with EmbedClient(self.target) as client:
            client.wait_until_serving(120)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"server never logged {pattern!r}; log:\n{''.join(self.log)}")

    def text(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


class Writers:
    """Threads that store batches (and, from the second round, delete stored keys) until the server dies."""

    def __init__(self, target: str, round_: int, acked: dict[str, bytes], deleted: set[str]) -> None:
        self.target, self.round, self.acked, self.deleted = target, round_, acked, deleted
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._store, args=(t,), daemon=True) for t in range(2)]
        self.errors: list[BaseException] = []
        for thread in self.threads:
            thread.start()

    def _store(self, t: int) -> None:
        rng = random.Random(self.round * 100 + t)
        with EmbedClient(self.target, timeout=30) as client:
            for i in range(10_000):
                keys = [f"r{self.round}/w{t}/{i}/{j}" for j in range(4)]
                images = [(key, tiny_jpeg(hash(key) & 0xFFFF), {"label": f"w{t}"}) for key in keys]
                try:
                    results = client.embed(images, store=True, collection="crash")
                except RemoteError:
                    return  # the server was killed: whatever was not answered was never acknowledged
                except BaseException as e:  # pragma: no cover - reported by the test
                    self.errors.append(e)
                    return
                with self.lock:
                    for r in results:
                        assert r.ok and r.vector is not None
                        self.acked[r.key] = r.vector.tobytes()
                if not (self.round and rng.random() < 0.3):
                    continue
                with self.lock:
                    # Until its delete is answered the victim is neither kept nor deleted: a delete the server
                    # applied and logged but could not answer before the kill is not acknowledged, yet done.
                    victim = rng.choice(sorted(self.acked))
                    self.acked.pop(victim)
                try:
                    client.delete_items([victim], collection="crash")
                except RemoteError:
                    return  # killed mid-delete: the victim may or may not be gone, so it is checked neither way
                except BaseException as e:  # pragma: no cover - reported by the test
                    self.errors.append(e)
                    return
                with self.lock:
                    self.deleted.add(victim)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)
        assert not self.errors, self.errors


def verify(target: str, acked: dict[str, bytes], deleted: set[str]) -> None:
    with EmbedClient(target) as client:
        stored = client.fetch_items(collection="crash") if acked or deleted else None
    if stored is None:
        return
    vectors = {key: vector.tobytes() for key, vector in zip(stored.keys, stored.vectors, strict=True)}
    lost = sorted(set(acked) - set(vectors))
    assert not lost, f"{len(lost)} acknowledged keys lost, e.g. {lost[:3]}"
    changed = [key for key, vector in acked.items() if vectors[key] != vector]
    assert not changed, f"{len(changed)} vectors differ, e.g. {changed[:3]}"
    revived = sorted(deleted & set(vectors))
    assert not revived, f"deleted keys came back: {revived[:3]}"


def last_record_keys(collection_dir: Path) -> tuple[Path, str, list[str]]:
    """The newest log file with a record, and the kind and keys of its last record."""
    for generation in reversed(wal.generations(collection_dir)):
        path = wal.log_path(collection_dir, generation)
        records = wal.read_generation(path).records
        if records:
            payload = records[-1]
            if payload[:1] == b"U":
                (length,) = struct.unpack_from("<I", payload, 1)
                return path, "U", json.loads(payload[5 : 5 + length])["keys"]
            return path, "D", json.loads(payload[1:])
    raise AssertionError("no log record to tear")


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
    config = tmp_path / "embedserve.toml"
    data_dir = tmp_path / "data"
    acked: dict[str, bytes] = {}
    deleted: set[str] = set()
    rng = random.Random(4)
    for round_ in range(ROUNDS):
        # Frequent snapshots (log rotation, truncation) except in the last round, whose log the end tears.
        snapshot_every = 3 if round_ < ROUNDS - 1 else 1_000_000
        config.write_text(CONFIG.format(data_dir=data_dir, snapshot_every=snapshot_every))
        server = ServerProcess(config)
        verify(server.target, acked, deleted)
        before = len(acked)
        writers = Writers(server.target, round_, acked, deleted)
        deadline = time.monotonic() + 60
        while len(acked) < before + 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))  # a random moment: mid-batch, mid-fsync, mid-snapshot...
        server.kill()
        writers.join()
        assert len(acked) > before, f"round {round_} stored nothing; log:\n{server.text()}"
    print(f"{len(acked)} acknowledged keys and {len(deleted)} deletes survived {ROUNDS} SIGKILLs")

    # A torn last record (a crash in the middle of writing it) is dropped with a warning; the rest is intact.
    path, kind, keys = last_record_keys(data_dir / "collections" / "crash")
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 3)
    for key in keys:  # the torn record is gone (its write is undone), so exclude it from the checks
        acked.pop(key, None) if kind == "U" else deleted.discard(key)
    server = ServerProcess(config)
    try:
        verify(server.target, acked, deleted)
        assert re.search(r"WARNING service\.index\.wal .*torn record", server.text())
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
