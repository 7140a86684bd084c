"""The GPU check's plumbing on the CPU: `--dry-run` runs every section at tiny sizes in one process, writing
results.json and the log after each section; the budget and a failing section are recorded, not fatal."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from tests.conftest import OCT_DIR

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_dry_run_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out), "--wheels", str(tmp_path / "no")]
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert results["dry_run"] is True
    ran = {name for name, s in sections.items() if s["status"] == "ok"}
    # faiss here is the CPU build: only that section may skip, with that reason.
    assert set(gpu_check.SECTIONS) - ran <= {"faiss_gpu"}, sections
    if "faiss_gpu" not in ran:
        assert "GPU support" in sections["faiss_gpu"]["reason"]
    assert sections["vision_9606"]["corrupted_ours"] == 0
    assert sections["engine_decode"]["cosine_min"] >= 0.99
    assert sections["cluster"]["kmeans_pp"]["k"] == 20
    engine = sections["engine_decode"]
    assert engine["pipelined_cosine_min_vs_sequential"] >= 0.9999 and engine["cuda_streams"] == 0  # no CUDA here
    assert engine["preprocess_warmup_launches"] == 0  # the reference runs on the CPU: nothing to compile
    bench = sections["bench_vectors"]
    names = [row["stage"] for row in bench["stages"]]
    assert names[0] == "preprocess" and any(n.startswith("kNN graph") for n in names)
    assert any("k-means" in n for n in names) and any(n.startswith("DBSCAN") for n in names)
    assert all(row["recall_at_10"] == 1.0 for row in bench["stages"] if row["stage"].startswith("kNN graph"))
    assert {e["stage"] for e in bench["skipped"]} >= {"kNN graph k=10 / faiss-gpu flat (exact)"}
    log = (out / "gpu_check.log").read_text()
    assert all(f"section {name}: ok" in log or f"section {name}: skipped" in log for name in gpu_check.SECTIONS)


def test_each_section_is_written_as_it_ends_and_failures_do_not_stop_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_on_disk: list[list[str]] = []

    def ok(check: gpu_check.Check) -> dict[str, object]:
        if (tmp_path / "results.json").exists():
            seen_on_disk.append(list(json.loads((tmp_path / "results.json").read_text())["sections"]))
        return {"value": 1}

    def broken(check: gpu_check.Check) -> dict[str, object]:
        raise ValueError("boom")

    def skip(check: gpu_check.Check) -> dict[str, object]:
        raise gpu_check.SkipSection("needs CUDA")

    def eat_budget(check: gpu_check.Check) -> dict[str, object]:
        check.budget_s = 0.0
        return {}

    fake = {"kernel_tests": broken, "vision_9606": skip, "engine_decode": eat_budget}
    monkeypatch.setattr(gpu_check, "_FUNCTIONS", {**{n: ok for n in gpu_check.SECTIONS}, **fake})
    args = argparse.Namespace(out=str(tmp_path), dry_run=True, budget=100.0, wheels=str(tmp_path / "no"), only="")
    assert gpu_check.run(args) == 1  # one section ended in error
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert seen_on_disk == [["versions", "kernel_tests"]]  # the third section saw the first two already written
    assert sections["kernel_tests"]["status"] == "error" and "ValueError: boom" in sections["kernel_tests"]["error"]
    assert sections["vision_9606"] == {"status": "skipped", "reason": "needs CUDA", "seconds": pytest.approx(0, abs=1)}
    after = gpu_check.SECTIONS[gpu_check.SECTIONS.index("engine_decode") + 1 :]
    assert all(sections[n]["status"] == "skipped" and "budget" in sections[n]["reason"] for n in after)


def test_oct_sample_is_where_the_check_reads_it() -> None:
    assert gpu_check.OCT_SAMPLE == OCT_DIR
    assert len(gpu_check._oct_jpegs(100)) >= 8
