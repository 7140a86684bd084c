"""The bad-image corpus through a real server and the real CLI: every bad image fails alone, nothing stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client.sync import EmbedClient, RemoteError
from tests.e2e.conftest import SpyEngine
from tests.unit.embedding.bad_corpus import BAD_DIR, bad_files

ATOL = 1e-4


class _HealthWatcher:
    """Polls the health service in a thread while a test runs and remembers every status it saw."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with EmbedClient(self.target) as client:
            while not self._stop.is_set():
                self.seen.append(client.health())
                time.sleep(0.02)

    def __enter__(self) -> _HealthWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_the_whole_corpus_in_one_request_fails_image_by_image(start_server, oct_images, reference) -> None:
    server = start_server()
    bad = bad_files()
    (k1, d1), (k2, d2) = oct_images[0], oct_images[17]
    images = [(k1, d1), *((f"bad/{f.name}", f.data) for f in bad), (k2, d2)]
    with _HealthWatcher(server.target) as watcher, EmbedClient(server.target) as client:
        results = client.embed(images)
        again = client.embed([(k1, d1)])  # and the server still embeds afterwards
        time.sleep(0.1)
    assert [r.key for r in results] == [k for k, _ in images]
    for f, r in zip(bad, results[1:-1], strict=True):
        assert not r.ok and r.vector is None, f.name
        assert r.error is not None and r.error.reason == f.expected_reason, (f.name, r.error)
    for (key, _), r in ((images[0], results[0]), (images[-1], results[-1]), (images[0], again[0])):
        assert r.ok and r.vector is not None
        np.testing.assert_allclose(r.vector, reference[key], atol=ATOL, rtol=0)
    assert watcher.seen and set(watcher.seen) == {"SERVING"}
    assert server.server.failure is None


def test_each_crasher_alone_in_its_own_request(start_server, oct_images, reference) -> None:
    server = start_server()
    with EmbedClient(server.target) as client:
        for name in ("crash-tiff-stripoffsets-double.tif", "crash-dds-pixel-format-flags-0.dds",
                     "crash-spider-stack-image.spi"):  # fmt: skip
            (result,) = client.embed([(name, (BAD_DIR / name).read_bytes())])
            assert not result.ok and result.error is not None
            assert client.health() == "SERVING"
        (ok,) = client.embed([oct_images[5]])
    np.testing.assert_allclose(ok.vector, reference[oct_images[5][0]], atol=ATOL, rtol=0)  # type: ignore[arg-type]


class _FlakyEngine(SpyEngine):
    """A real engine whose forward pass fails (not fatally) for the next `failures` batches."""

    failures = 1

    def run(self, prepared):  # type: ignore[no-untyped-def]
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("cuBLAS workspace exhausted (internal detail)")
        return super().run(prepared)


def test_a_failed_batch_is_internal_with_a_request_id_and_the_server_keeps_serving(
    start_server, engine, oct_images, reference
) -> None:
    server = start_server(engine_=_FlakyEngine(engine))
    with EmbedClient(server.target) as client:
        with pytest.raises(RemoteError) as info:
            client.embed(oct_images[:1])
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "internal detail" not in info.value.details
        assert client.health() == "SERVING"
        (ok,) = client.embed(oct_images[:1])
    np.testing.assert_allclose(ok.vector, reference[oct_images[0][0]], atol=ATOL, rtol=0)  # type: ignore[arg-type]
    assert server.server.failure is None


def test_cli_embed_records_crashing_files_as_failures(tmp_path: Path, oct_files: list[Path]) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for f in oct_files[:3]:
        shutil.copy(f, root / f.name)
    crashers = ["crash-tiff-stripoffsets-double.tif", "trunc-jpeg-7000x7000-35k-eoi.jpg"]
    for name in crashers:
        shutil.copy(BAD_DIR / name, root / name)
    out = tmp_path / "x.parquet"
    command = [sys.executable, "-m", "service.cli.main", "embed", str(root), "--out", str(out), "--quiet"]
    env = os.environ | {"EMBEDSERVE_BACKBONE_DEVICE": "cpu"}
    for _ in range(2):  # a re-run goes through the same way instead of aborting
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 1, proc.stderr  # EXIT_IMAGES_FAILED, as for any failed image
        assert "Traceback" not in proc.stderr
        assert "2 failed" in proc.stderr
    assert out.exists()
    failures = out.with_name(out.name + ".failures.csv").read_text()
    assert all(name in failures for name in crashers)
