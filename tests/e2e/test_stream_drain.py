"""SIGTERM with an open EmbedStream, and a remote `embed --store` job whose server is killed and restarted.

Real server subprocesses (`run_server`, the real CPU model) on loopback; each test is bounded to a couple of minutes.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from service.client import EmbedClient, RemoteError
from tests.e2e.conftest import make_config

REPO = Path(__file__).resolve().parents[2]
OCT_SAMPLE = REPO / "tests" / "data" / "oct-sample"

CONFIG = """
[engine]
batch_size = 4
prefetch_batches = 1

[decode]
workers = 1

[batcher]
max_batch_size = 4
max_queue_delay_ms = 5.0
max_queue_size = 64

[server]
metrics_port = -1
grace_seconds = 30.0
"""

SERVE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
    "from service.config import load_config\n"
    "from service.api.server import run_server\n"
    "sys.exit(run_server(load_config(sys.argv[1])))\n"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


class ServerProcess:
    """`run_server` in a subprocess; its stderr is collected line by line."""

    def __init__(self, tmp_path: Path, data_dir: Path, port: int = 0, name: str = "server") -> None:
        config = tmp_path / f"{name}.toml"
        config.write_text(f'data_dir = "{data_dir}"\n' + CONFIG + f"port = {port}\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(config)],
            cwd=REPO,
            env=_env(),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = int(self.wait_for(r"listening on [\d.]+:(\d+)", timeout=90).group(1))
        self.target = f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"server never logged {pattern!r}; log so far:\n{''.join(self.seen)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def offline_vectors() -> dict[str, np.ndarray]:
    """The offline engine's vectors of the OCT sample, by key: the reference for what the server answers."""
    from service.embedding.engine import Engine

    images = _images()
    with Engine.from_config(make_config(decode__workers=1)) as engine:
        outcomes = engine.embed([data for _, data in images])
    assert all(o.vector is not None for o in outcomes)
    return {key: o.vector for (key, _), o in zip(images, outcomes, strict=True)}  # type: ignore[misc]


def _images() -> list[tuple[str, bytes]]:
    return [(p.relative_to(OCT_SAMPLE).as_posix(), p.read_bytes()) for p in sorted(OCT_SAMPLE.rglob("*.jpeg"))]


@pytest.mark.slow
def test_sigterm_ends_an_open_stream_with_unavailable_within_seconds(
    tmp_path: Path, offline_vectors: dict[str, np.ndarray]
) -> None:
    images = _images()
    server = ServerProcess(tmp_path, tmp_path / "data")
    try:
        sent: list[list[str]] = []

        def batches() -> Iterator[list[tuple[str, bytes]]]:
            # Endless: the client never ends the stream by itself, so only the drain can end it.
            for i in itertools.count():
                batch = [images[(4 * i + j) % len(images)] for j in range(4)]
                sent.append([key for key, _ in batch])
                yield batch

        answered: list[list[tuple[str, np.ndarray]]] = []
        with EmbedClient(server.target) as client:
            client.wait_until_serving(120)
            stream = client.embed_stream(batches())
            with pytest.raises(RemoteError) as ended:
                for results in stream:
                    answered.append([(r.key, r.vector) for r in results if r.vector is not None])
                    if len(answered) == 2:
                        server.proc.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
            ended_after = time.monotonic() - signalled
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE, ended.value
        assert "shutting down" in ended.value.details
        assert ended_after < 10.0, f"the stream ended {ended_after:.1f} s after SIGTERM (grace is 30 s)"
        assert len(answered) >= 2
        for i, results in enumerate(answered):  # every answer is complete, in order and correct
            assert [key for key, _ in results] == sent[i]
            for key, vector in results:
                # The server's runtime may differ from the offline one (bf16 on AMX): the product's fidelity bar.
                assert float(vector @ offline_vectors[key]) > 0.995, key
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_a_remote_store_job_resumes_on_a_restarted_server_and_stores_every_image_once(tmp_path: Path) -> None:
    # 96 images (the 32 scans under three prefixes), so that the job is well under way when the server dies.
    root = tmp_path / "scans"
    for copy in ("a", "b", "c"):
        shutil.copytree(OCT_SAMPLE, root / copy)
    expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpeg"))
    assert len(expected) == 96
    data_dir, out = tmp_path / "data", tmp_path / "out.parquet"
    first = ServerProcess(tmp_path, data_dir, name="first")
    second: ServerProcess | None = None
    job: subprocess.Popen[str] | None = None
    try:
        command = [sys.executable, "-m", "service.cli.main", "embed", str(root), "--out", str(out)]
        command += ["--server", first.target, "--store", "--collection", "jobs", "--batch-size", "4"]
        command += ["--wait", "120", "--quiet"]
        stored = 0
        with EmbedClient(first.target) as client:
            client.wait_until_serving(120)  # so that the job's only wait is the outage's
            job = subprocess.Popen(command, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 120
            while stored < 8 and time.monotonic() < deadline and job.poll() is None:
                try:
                    stored = client.collection_info("jobs").count
                except RemoteError:
                    stored = 0  # not created yet
                time.sleep(0.05)
        assert 8 <= stored < 96, f"{stored} stored before the kill; the test needs a job in progress"
        first.proc.kill()  # no drain: the stream breaks mid-flight
        first.proc.wait(timeout=10)
        time.sleep(1.0)
        second = ServerProcess(tmp_path, data_dir, port=first.port, name="second")
        _, stderr = job.communicate(timeout=150)
        assert job.returncode == 0, stderr
        assert stderr.count("embedserve: waiting up to") == 1, stderr  # said once per outage, not per retry
        with EmbedClient(second.target) as client:
            client.wait_until_serving(60)
            assert client.collection_info("jobs").count == 96
            keys = client.fetch_items(collection="jobs", include_vectors=False).keys
        assert sorted(keys) == expected and len(set(keys)) == len(keys)
        table = pq.read_table(out)
        assert sorted(table.column("key").to_pylist()) == expected
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait(timeout=10)
        first.stop()
        if second is not None:
            second.stop()
