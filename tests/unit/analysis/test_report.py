"""The HTML report and the cluster/probe/filter/report commands on a Parquet file of the real OCT sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.analysis.report import SECTIONS
from service.cli import analysis as cli_cluster
from tests.unit.analysis.sample_files import oct_table, run


@pytest.fixture(scope="module")
def oct_parquet(tmp_path_factory: pytest.TempPathFactory, oct_embeddings: np.ndarray, oct_files: list[Path]) -> Path:
    """What `embedserve embed tests/data/oct-sample --out oct.parquet` writes."""
    path = tmp_path_factory.mktemp("oct") / "oct.parquet"
    table = oct_table(oct_embeddings, oct_files)
    pq.write_table(table, path)
    return path


def test_report_has_every_section(oct_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    code = run(["report", "--parquet", str(oct_parquet), "--k", "4", "--ground-truth", "label", "--out", str(out)])
    assert code == 0
    page = out.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("<svg") - page.count('class="icon"') == 5  # projection x2, heat map, sweep, k-distance
    assert page.count("<div class=cl>") == 4  # one exemplar block per cluster
    # Up to 8 thumbnails per cluster, fewer in a cluster of fewer members: every cluster shows all it can.
    assert 16 <= len(re.findall(r'src="data:image/jpeg;base64,', page)) <= 32
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
        assert cls in page


def test_cluster_command_prints_table_and_metrics(
    oct_parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.json"
    argv = ["cluster", "--parquet", str(oct_parquet), "--algorithm", "kmeans", "--k", "4", "--ground-truth", "label"]
    assert run([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cluster by label" in text and "accuracy" in text and "nmi" in text and "DRUSEN" in text
    payload = json.loads(out.read_text())
    assert len(payload["assignments"]) == 32 and payload["k"] == 4 and payload["metrics"]["accuracy"] > 0.3
    assert run([*argv[:-4], "--features", "raw", "--k", "4", "--ground-truth", "label"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert run(["cluster", "--parquet", str(oct_parquet), "--algorithm", "dbscan", "--min-samples", "3"]) == 0
    assert "eps" in capsys.readouterr().out


def test_probe_and_filter_commands(oct_parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            [
                "probe",
                "--parquet",
                str(oct_parquet),
                "--target",
                "label",
                "--group-pattern",
                r"[A-Z]-(\d+)-",
                "--folds",
                "4",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "logreg: accuracy" in text and "grouped by" in text and "confusion" in text
    drusen = ["DRUSEN/DRUSEN-9800172-2.jpeg", "DRUSEN/DRUSEN-9837663-1.jpeg", "DRUSEN/DRUSEN-9861332-1.jpeg"]
    remove = tmp_path / "remove.txt"
    argv = ["filter", "--parquet", str(oct_parquet), "--examples", *drusen, "--unwanted-attribute", "label"]
    assert run([*argv, "--unwanted-values", "DRUSEN", "--remove-out", str(remove)]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "quality 0.3·P + 0.7·R" in text
    removed = remove.read_text().split()
    assert set(drusen) <= set(removed)
    assert (
        run([*argv, "--unwanted-values", "DRUSEN", "--by-cluster", "--k", "4", "--json", str(tmp_path / "f.json")]) == 0
    )
    payload = json.loads((tmp_path / "f.json").read_text())
    assert payload["method"] == "cluster" and payload["removed_clusters"] and set(drusen) <= set(payload["remove"])


def test_usage_errors(oct_parquet: Path) -> None:
    with pytest.raises(cli_cluster.UsageError, match="either --parquet"):
        run(["cluster", "--k", "4"])
    with pytest.raises(cli_cluster.UsageError, match="colour"):
        run(["cluster", "--parquet", str(oct_parquet), "--k", "4", "--ground-truth", "colour"])
