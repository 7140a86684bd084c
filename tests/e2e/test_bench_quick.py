"""`embedserve bench run --quick` runs every stage and writes a complete, well-formed results file.

No speed is asserted here: timings belong to the benchmark, not to tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

STAGE_PREFIXES = (
    "decode/pillow",
    "decode/torchvision",
    "decode/dali",
    "preprocess",
    "backbone/eager fp32",
    "backbone/freeze",
    "end-to-end offline",
    "end-to-end gRPC",
    "overload/unloaded",
    "overload/flood",
    "kNN graph k=10 / faiss flat",
    "kNN graph k=10 / faiss hnsw",
    "kNN graph k=10 / faiss ivf-flat",
    "k-means k=4",
    "DBSCAN",
    "HDBSCAN",
)


@pytest.mark.slow
def test_quick_bench_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    markdown = tmp_path / "summary.md"
    env = os.environ | {"EMBEDSERVE_BACKBONE_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "service.cli.main", "bench", "run", "--quick", "--n", "72", "--clients", "4"]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--markdown", str(markdown)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"date", "command", "device", "versions", "data", "settings", "stages"} <= set(result)
    assert result["data"]["images"] == 72 and result["data"]["synthetic"] is True
    names = [s["name"] for s in result["stages"]]
    for prefix in STAGE_PREFIXES:
        assert any(n.startswith(prefix) for n in names), f"stage {prefix!r} missing from {names}"
    for stage in result["stages"]:
        assert math.isfinite(stage["value"]) and stage["value"] > 0, stage
        assert stage["unit"] in ("images/s", "seconds")
        assert stage["peak_host_bytes"] > 0, stage
        if stage["baseline"] is not None:
            assert stage["ratio"] is not None and stage["ratio"] > 0
    offline = next(s for s in result["stages"] if s["name"].startswith("end-to-end offline"))
    assert offline["images"] == 72 and offline["details"]["failed"] == 0
    # The baseline and the engine embed the same images nearly identically (different resize code paths).
    assert offline["details"]["agreement_mean_cosine"] > 0.98
    grpc = next(s for s in result["stages"] if s["name"].startswith("end-to-end gRPC"))
    assert grpc["p50_ms"] is not None and grpc["p99_ms"] >= grpc["p50_ms"]
    assert "| stage |" in markdown.read_text()
