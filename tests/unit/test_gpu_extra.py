"""The `gpu` extra: one CUDA build per library, and a set pip resolves (checked against the package registry)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_no_faiss_gpu_build_beside_faiss_cpu() -> None:
    """faiss-cpu and every faiss-gpu wheel install into the same `faiss/` package: never both."""
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        names = {_name(r) for r in requirements}
        if "faiss-cpu" in core:
            assert not {n for n in names if n.startswith("faiss-gpu")}, f"extra {extra} adds faiss-gpu to faiss-cpu"


@pytest.mark.slow
@pytest.mark.network
def test_gpu_extra_resolves_to_one_cuda_13_set(tmp_path: Path) -> None:
    """pip resolves `.[gpu]` for this Python without falling back to a CUDA 12 torch (about 3 minutes)."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    cmd += ["--report", str(report), "-c", str(ROOT / "constraints.txt"), f"{ROOT}[gpu]"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    installed = {i["metadata"]["name"].lower(): i["metadata"] for i in json.loads(report.read_text())["install"]}
    assert "cuml-cu13" in installed and "nvidia-dali-cuda130" in installed
    torch = installed["torch"]
    major, minor = (int(p) for p in torch["version"].split(".")[:2])
    assert (major, minor) >= (2, 11), f"pip backtracked to torch {torch['version']} (a CUDA 12 build)"
    assert any(r.startswith("cuda-toolkit") and "==13." in r for r in torch.get("requires_dist", [])), torch
    cuda12 = sorted(n for n in installed if n.endswith("-cu12") or n.endswith("-cuda120"))
    assert not cuda12, f"CUDA 12 packages in the CUDA 13 set: {cuda12}"
    assert not [n for n in installed if n.startswith("faiss-gpu")] and "faiss-cpu" in installed
