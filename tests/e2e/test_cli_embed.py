"""The `embedserve embed` command as a user runs it: a real process over the real OCT sample."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from service.embedding.engine import Engine

CLI = [sys.executable, "-m", "service.cli.main"]


def _env() -> dict[str, str]:
    return os.environ | {"EMBEDSERVE_BACKBONE_DEVICE": "cpu"}


def test_embed_sample_writes_32_correct_rows(
    tmp_path: Path, oct_dir: Path, oct_files: list[Path], oct_embeddings: np.ndarray, engine: Engine
) -> None:
    out = tmp_path / "x.parquet"
    proc = subprocess.run(
        [*CLI, "embed", str(oct_dir), "--out", str(out), "--batch-size", "16"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "32 embedded, 0 failed" in proc.stderr
    table = pq.read_table(out)
    assert table.column_names == ["key", "path", "label", "embedding"]
    assert table.num_rows == 32
    rows = {r["key"]: r for r in table.to_pylist()}
    for i, f in enumerate(oct_files):
        row = rows[f"{f.parent.name}/{f.name}"]
        assert row["label"] == f.parent.name
        np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), oct_embeddings[i], atol=1e-5)


def test_failed_images_set_the_exit_code(tmp_path: Path, oct_files: list[Path]) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "good.jpeg").write_bytes(oct_files[0].read_bytes())
    (root / "bad.jpeg").write_bytes(b"garbage")
    out = tmp_path / "x.parquet"
    proc = subprocess.run(
        [*CLI, "embed", str(root), "--out", str(out), "--quiet"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1
    assert "bad.jpeg: invalid_image" in proc.stderr
    assert pq.read_table(out).num_rows == 1
    assert "bad.jpeg,invalid_image" in (tmp_path / "x.parquet.failures.csv").read_text()


def test_killed_run_resumes_without_loss(tmp_path: Path, oct_dir: Path) -> None:
    out = tmp_path / "x.parquet"
    cmd = [*CLI, "embed", str(oct_dir), "--out", str(out), "--batch-size", "4", "--part-rows", "4", "--quiet"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = sorted(parts.glob("part-*.parquet"))
    assert kept, "the run was killed before it flushed anything; the test needs at least one part"
    for part in kept:
        assert pq.read_table(part).num_rows > 0  # every part on disk is complete and readable
    done = subprocess.run([*cmd], env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.num_rows == 32
    assert len(set(table.column("key").to_pylist())) == 32
    assert not parts.exists()


def test_bad_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "embed", str(tmp_path / "missing"), "--out", str(tmp_path / "x.parquet"), "--quiet"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr
