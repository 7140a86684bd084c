"""The kernel bench runs: its kernel paths through the interpreter at tiny sizes, its CLI on the CPU."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import kernels as kb

TINY = kb.Sizes(
    images=3,
    cpu_images=2,
    image_size=(8, 8),
    vectors=8,
    dim=16,
    points=40,
    clusters=4,
    queries=5,
    database=40,
    k=3,
    reps=1,
    shapes=((12, 10), (3, 9, 14)),
)


def test_kernel_rows_are_timed_and_checked(device: str) -> None:
    rows = []
    for bench in (kb._bench_preprocess, kb._bench_normalize, kb._bench_kmeans, kb._bench_topk):
        rows.extend(bench(TINY, torch.device(device), True))
    assert {row.kernel for row in rows} == {
        "preprocess",
        "l2_normalize",
        "kmeans_assign",
        "kmeans_update",
        "search_topk",
    }
    for row in rows:
        assert row.triton_ms is not None
        assert row.speedup is not None
        assert row.speedup > 0
        # fp16 preprocess output: about one ulp; tf32 on a GPU: ~1e-3 relative on distances up to ~60.
        bound = 0.2 if "tf32" in row.note else 1e-2
        assert row.max_abs_err is None or row.max_abs_err < bound
    table = kb.to_markdown({"device": "x", "torch": "t", "triton": "v", "note": "", "rows": [asdict(r) for r in rows]})
    assert table.count("\n| ") == len(rows) + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_cli_without_gpu_times_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert kb.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert kb.NO_GPU_NOTE in printed
    assert "| preprocess |" in printed
    result = json.loads(out.read_text())
    assert result["triton_timed"] is False
    assert all(row["triton_ms"] is None and row["reference_ms"] > 0 for row in result["rows"])
