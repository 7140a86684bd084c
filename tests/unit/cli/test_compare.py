"""`embedserve compare`: the table on stdout, progress on stderr, `--json`, and exit code 2 for bad grid values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from service.cli.main import main
from tests.conftest import OCT_DIR

PATIENT = r"[A-Z]+-(\d+)-"


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's TorchScript model: ResNet-18 with random weights (plumbing only, its numbers mean nothing)."""
    path = tmp_path_factory.mktemp("models") / "resnet18.ts"
    torch.manual_seed(0)
    torch.jit.script(torchvision.models.resnet18(weights=None).eval()).save(str(path))
    return path


def test_compare_prints_one_table_and_writes_json(
    resnet18: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "table.json"
    argv = ["compare", str(OCT_DIR), "--backbone", f"torchscript:{resnet18}", "--features", "cnn,raw"]
    argv += ["--folds", "4", "--group-pattern", PATIENT, "--seeds", "2", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "32 images, 4 classes (CNV 8, DME 8, DRUSEN 8, NORMAL 8); mean of seeds 0..1"
    assert "4 folds, grouped by pattern" in lines[1] and "chance 0.250" in lines[1]
    header = lines[3].split()
    assert header == ["setting", "dim", "n", "img/s", "km", "acc", "km", "nmi", "km", "ari", "probe"]
    assert lines[4].startswith("torchscript:resnet18.ts squash") and lines[5].startswith("raw pixels")
    assert "[1/2] torchscript:resnet18.ts squash: 32 embedded" in captured.err  # progress on stderr only
    assert "embedded" not in captured.out

    payload = json.loads(out.read_text())
    assert payload["images"] == 32 and payload["chance"] == 0.25 and payload["options"]["seeds"] == 2
    cnn, raw = payload["rows"]
    assert (cnn["features"], cnn["backbone"], cnn["resize"], cnn["pad"]) == (
        "cnn",
        f"torchscript:{resnet18}",
        "squash",
        None,
    )
    assert cnn["dim"] == 1000 and raw["dim"] == 4096 and raw["backbone"] is None
    for row, line in zip((cnn, raw), lines[4:6], strict=True):
        assert row["n"] == 32 and not row["failed"]
        km = row["kmeans"]
        assert len(km["per_seed"]) == 2 and len(row["probe"]["per_seed"]) == 2
        assert km["accuracy"] == pytest.approx(sum(s["accuracy"] for s in km["per_seed"]) / 2)
        assert row["probe"]["accuracy"] == pytest.approx(sum(row["probe"]["per_seed"]) / 2)
        cells = line.split()[-5:]  # img/s, km acc, km nmi, km ari, probe: the printed table is the JSON's
        assert cells[1:] == [f"{v:.3f}" for v in (km["accuracy"], km["nmi"], km["ari"], row["probe"]["accuracy"])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resize", "letterbox", "--pad", "zero,red"], "pad 'red' is not one of zero, white, edge"),
        (["--resize", "squash,crop"], "resize 'crop' is not one of squash, letterbox"),
        (["--features", "cnn,hog"], "features 'hog' is not one of cnn, raw"),
        (["--pad", "white"], "--pad only applies to letterbox resizing: add --resize letterbox"),
        (["--backbone", "efficientnet_lite0", "--features", "raw"], "--backbone choose CNN embeddings"),
        (["--backbone", "resnet50"], "backbone 'resnet50' is unknown"),
        (["--backbone", "torchscript:/nonexistent/model.ts"], "/nonexistent/model.ts is not a file"),
        (["--backbone", "efficientnet_lite0,,efficientnet_lite2"], "a backbone name is empty"),
        (["--seeds", "0"], "seeds=0"),
        (["--group-pattern", "(["], "not a valid regex"),
        (["--group-pattern", r"patient-(\d+)", "--features", "raw"], "does not match key"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(OCT_DIR), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_a_directory_that_is_not_there_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
