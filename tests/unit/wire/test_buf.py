"""`buf lint` (STANDARD) passes on protos/ and `buf breaking` against the released image both passes and catches a
breaking change, run with the pinned buf that `make buf` installs into .tools/.

Without that binary these skip, except under CI (`CI` set and not false), where a missing buf is a failure: CI runs
`make test`, whose `lint` step installs it first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUF = REPO / ".tools" / "node_modules" / ".bin" / "buf"
BASELINE = REPO / "protos" / "released" / "embedserve-v1.binpb"
EMBEDDER_PROTO = Path("protos/embedserve/v1/embedder.proto")


def _buf() -> Path:
    if BUF.is_file() and os.access(BUF, os.X_OK):
        return BUF
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{BUF} is missing under CI; `make buf` installs it (npm install @bufbuild/buf into .tools/)")
    pytest.skip(f"{BUF} is missing; `make buf` installs it")


def run_buf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_buf()), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """protos/ and buf.yaml copied to a temporary workspace (the baseline stays the repository's)."""
    _buf()
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    shutil.copy2(REPO / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def _edit(root: Path, old: str, new: str) -> None:
    path = root / EMBEDDER_PROTO
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {EMBEDDER_PROTO} exactly once"
    path.write_text(text.replace(old, new))


def test_lint_passes() -> None:
    result = run_buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_release() -> None:
    result = run_buf("breaking", "protos", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_fails_on_a_deleted_field(copy: Path) -> None:
    assert run_buf("breaking", "protos", "--against", str(BASELINE), cwd=copy).returncode == 0
    _edit(copy, "  string search_backend = 8;\n", "")
    result = run_buf("breaking", "protos", "--against", str(BASELINE), cwd=copy)
    assert result.returncode != 0
    assert 'field "8" with name "search_backend"' in result.stdout


def test_breaking_fails_on_a_changed_field_type(copy: Path) -> None:
    _edit(copy, "  int64 bytes_on_disk = 7;", "  int32 bytes_on_disk = 7;")
    result = run_buf("breaking", "protos", "--against", str(BASELINE), cwd=copy)
    assert result.returncode != 0 and "bytes_on_disk" in result.stdout


def test_an_added_field_is_not_breaking(copy: Path) -> None:
    _edit(copy, "  string search_backend = 8;\n", "  string search_backend = 8;\n  string note = 9;\n")
    result = run_buf("breaking", "protos", "--against", str(BASELINE), cwd=copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_fails_on_a_shared_response_and_a_service_without_the_suffix(copy: Path) -> None:
    _edit(copy, "service EmbedderService {", "service Embedder {")
    _edit(
        copy,
        "rpc CreateCollection(CreateCollectionRequest) returns (CreateCollectionResponse);",
        "rpc CreateCollection(CreateCollectionRequest) returns (GetCollectionInfoResponse);",
    )
    result = run_buf("lint", cwd=copy)
    assert result.returncode != 0
    assert 'Service name "Embedder" should be suffixed with "Service"' in result.stdout
    assert '"embedserve.v1.GetCollectionInfoResponse" is used as the request or response type for multiple RPCs' in (
        result.stdout
    )
