"""The HTML report read back as a document: every point of issue 14 checked against an independent computation.

The page comes from `embedserve report` on the 32 real OCT scans; the test parses it with `html.parser` and
recomputes what it should say with scikit-learn (PCA) and SciPy (`linear_sum_assignment`) from the Parquet file
and the assignments `embedserve cluster --json` reports for the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA

from service.analysis import evaluate
from service.analysis.report import SECTIONS, explained_variance, matched_order
from service.analysis.report_plots import CLUSTER_COLOURS, LABEL_PALETTE, cluster_marker
from service.cli import analysis as cli_analysis
from service.client import RemoteError
from service.types import Contingency, ModelInfo
from tests.unit.analysis.sample_files import oct_table, run

META = {
    b"embedserve.model": b"efficientnet_lite0",
    b"embedserve.dim": b"1280",
    b"embedserve.runtime": b"torch",
    b"embedserve.precision": b"float32",
    b"embedserve.version": b"0.1.0",
    b"embedserve.device": b"cpu",
}


# -- a small DOM ----------------------------------------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        out = []
        for c in self.children:
            if c.tag == tag and all(c.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(c)
            out += c.find_all(tag, **attrs)
        return out

    def find(self, tag: str, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]


class _Builder(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "hr", "input", "link"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        child = Node(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(child)
        if tag not in self.VOID:
            self.node = child

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.node.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.node))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.node.tag == tag, f"</{tag}> closes <{self.node.tag}>"
        assert self.node.parent is not None
        self.node = self.node.parent

    def handle_data(self, data: str) -> None:
        self.node.text += data


def parse(page: str) -> Node:
    b = _Builder()
    b.feed(page)
    b.close()
    assert b.node is b.root, f"unclosed <{b.node.tag}>"
    return b.root


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oct_file(tmp_path_factory: pytest.TempPathFactory, oct_embeddings: np.ndarray, oct_files: list[Path]) -> Path:
    """What `embedserve embed tests/data/oct-sample --out oct.parquet` writes, model metadata included."""
    path = tmp_path_factory.mktemp("oct") / "oct.parquet"
    table = oct_table(oct_embeddings, oct_files)
    pq.write_table(table.replace_schema_metadata(META), path)
    return path


@dataclass
class Report:
    page: str
    dom: Node
    keys: list[str]
    labels: list[str]
    vectors: np.ndarray
    assignments: dict[str, int]
    made_at: datetime


ARGS = ["--algorithm", "kmeans", "--k", "4", "--pca", "0", "--backend", "sklearn", "--ground-truth", "label"]


@pytest.fixture(scope="module")
def report(oct_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("report")
    made_at = datetime.now(UTC)
    assert run(["report", "--parquet", str(oct_file), *ARGS, "--out", str(out / "r.html")]) == 0
    assert run(["cluster", "--parquet", str(oct_file), *ARGS, "--json", str(out / "c.json")]) == 0
    table = pq.read_table(oct_file)
    page = (out / "r.html").read_text()
    return Report(
        page=page,
        dom=parse(page),
        keys=table["key"].to_pylist(),
        labels=table["label"].to_pylist(),
        vectors=np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64),
        assignments=json.loads((out / "c.json").read_text())["assignments"],
        made_at=made_at,
    )


def _plot(r: Report, name: str) -> Node:
    return r.dom.find("svg", data_plot=name)


def _points(svg: Node) -> list[Node]:
    return [n for n in svg.find_all("circle") + svg.find_all("polygon") if "point" in n.attrs.get("class", "")]


# -- the checks -----------------------------------------------------------------------------------------------------


def test_sections_in_order(report: Report) -> None:
    ids = [n.attrs["id"] for n in report.dom.find_all("section")]
    assert ids == list(SECTIONS)


def test_palettes_are_disjoint(report: Report) -> None:
    by_cluster, by_label = _points(_plot(report, "scatter-cluster")), _points(_plot(report, "scatter-label"))
    assert len(by_cluster) == len(by_label) == 32
    cluster_paint = {n.attrs["fill"] for n in by_cluster} | {n.attrs["stroke"] for n in by_cluster}
    label_fill = {n.attrs["fill"] for n in by_label}
    assert cluster_paint - {"#ffffff"} <= CLUSTER_COLOURS
    assert label_fill <= set(LABEL_PALETTE) and not label_fill & cluster_paint
    # One colour per class, one marker (shape and fill) per cluster, in both plots by the point's key.
    colour_of: dict[str, set[str]] = {}
    for key, node in zip(_keys_of(by_label), by_label, strict=True):
        colour_of.setdefault(report.labels[report.keys.index(key)], set()).add(node.attrs["fill"])
    assert all(len(v) == 1 for v in colour_of.values()) and len(label_fill) == 4
    expected = {c: cluster_marker(c) for c in set(report.assignments.values())}
    for key, node in zip(_keys_of(by_cluster), by_cluster, strict=True):
        m = expected[report.assignments[key]]
        assert node.tag == ("circle" if m.shape == "circle" else "polygon") and node.attrs["fill"] == m.fill
    assert len({(m.shape, m.fill) for m in expected.values()}) == 4
    # Exemplar borders are label colours too, never a cluster's ink.
    imgs = report.dom.find("section", id="exemplars").find_all("img")
    borders = {n.attrs["style"].removeprefix("border-color:") for n in imgs}
    assert borders and borders <= label_fill


def _keys_of(points: list[Node]) -> list[str]:
    return [p.find("title").all_text().split("\n")[0] for p in points]


def test_hover_texts_name_key_cluster_and_label(report: Report) -> None:
    for plot in ("scatter-cluster", "scatter-label"):
        tips = [p.find("title").all_text().split("\n") for p in _points(_plot(report, plot))]
        assert sorted(t[0] for t in tips) == sorted(report.keys)
        for key, cluster, label in tips:
            assert cluster == f"cluster {report.assignments[key]}"
            assert label == f"label {key.split('/')[0]}"


def test_axes_show_the_explained_variance_of_sklearn_pca(report: Report) -> None:
    want = PCA(n_components=2, svd_solver="full").fit(report.vectors).explained_variance_ratio_
    for plot in ("scatter-cluster", "scatter-label"):
        svg = _plot(report, plot)
        for axis, ratio in zip(("x", "y"), want, strict=True):
            title = svg.find("text", data_axis=axis).all_text()
            m = re.fullmatch(r"PC ([12]) \((\d+\.\d) % of variance\)", title)
            assert m is not None, title
            assert m.group(1) == ("1" if axis == "x" else "2")
            assert float(m.group(2)) == pytest.approx(100 * ratio, abs=0.051)


def test_explained_variance_matches_sklearn_with_the_randomized_solver() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 90)) * np.geomspace(8, 0.1, 90)  # sklearn picks its randomized solver here
    proj = evaluate.projection_2d(x.astype(np.float32), seed=0)
    got = explained_variance(x, proj)
    assert got is not None
    np.testing.assert_allclose(got, PCA(2, svd_solver="full").fit(x).explained_variance_ratio_, rtol=1e-3)
    assert explained_variance(np.zeros((0, 0)), proj) is None  # a clustering from the wire has no features
    assert explained_variance(np.ones((5, 3)), np.zeros((5, 2))) is None  # no variance at all


def _contingency(report: Report) -> tuple[list[int], list[str], np.ndarray]:
    clusters = sorted(set(report.assignments.values()))
    classes = sorted(set(report.labels))
    counts = np.zeros((len(clusters), len(classes)), np.int64)
    for key, label in zip(report.keys, report.labels, strict=True):
        counts[clusters.index(report.assignments[key]), classes.index(label)] += 1
    return clusters, classes, counts


def test_heatmap_rows_follow_the_hungarian_matching(report: Report) -> None:
    clusters, classes, counts = _contingency(report)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    want_order = [clusters[r] for r, _ in sorted(zip(rows, cols, strict=True), key=lambda rc: rc[1])]
    svg = _plot(report, "heatmap")
    got_order = [int(n.attrs["data-cluster"]) for n in svg.find_all("text", **{"class": "row"})]
    assert got_order == want_order
    assert [n.attrs["data-class"] for n in svg.find_all("text", **{"class": "col"})] == classes
    matched = {
        (int(n.attrs["data-cluster"]), n.attrs["data-class"]) for n in svg.find_all("rect", **{"class": "matched"})
    }
    assert matched == {(clusters[r], classes[c]) for r, c in zip(rows, cols, strict=True)}
    for n in svg.find_all("rect", **{"class": "cell"}):
        i, j = clusters.index(int(n.attrs["data-cluster"])), classes.index(n.attrs["data-class"])
        assert int(n.attrs["data-count"]) == counts[i, j]
    # The diagonal is the matching, and the accuracy in the metrics table is what it covers.
    accuracy = counts[rows, cols].sum() / 32
    assert f"<th>accuracy</th><td class=v>{accuracy:.3f}".rstrip("0") in report.page


def test_heatmap_has_a_colour_scale(report: Report) -> None:
    _, _, counts = _contingency(report)
    scale = _plot(report, "heatmap").find("g", id="heatmap-scale")
    assert int(scale.attrs["data-max"]) == counts.max() and scale.attrs["data-min"] == "0"
    ticks = [int(t.all_text()) for t in scale.find_all("text", **{"class": "tick"})]
    assert ticks[0] == 0 and ticks[-1] == counts.max()
    assert "items per cell" in scale.all_text() and len(scale.find_all("rect")) >= 5


def test_matched_order_puts_surplus_clusters_then_noise_last() -> None:
    # 3 clusters + noise over 2 classes: clusters 0 and 2 match, 1 is surplus, noise goes last.
    table = Contingency(clusters=[-1, 0, 1, 2], classes=["a", "b"], counts=np.array([[5, 5], [0, 9], [3, 1], [8, 0]]))
    order, pairs = matched_order(table)
    assert [table.clusters[i] for i in order] == [2, 0, 1, -1]
    rows, cols = linear_sum_assignment(table.counts[1:], maximize=True)
    assert pairs == {(int(r) + 1, int(c)) for r, c in zip(rows, cols, strict=True)}


def test_sweep_plot_titles_both_axes(report: Report) -> None:
    svg = _plot(report, "sweep")
    assert svg.find("text", data_axis="x").all_text().startswith("k")
    assert "silhouette" in svg.find("text", data_axis="y").all_text()
    assert "inertia" in svg.find("text", data_axis="y2").all_text()
    assert len(svg.find_all("line", **{"class": "highlight"})) == 1  # the chosen k


def test_header_names_model_runtime_precision_device_and_date(report: Report) -> None:
    head = report.dom.find("section", id="provenance")
    fields = {n.attrs["data-field"]: n.all_text() for n in head.find_all("dd")}
    assert fields["model"] == "efficientnet_lite0 (1280-d)"
    assert (fields["runtime"], fields["precision"], fields["device"], fields["version"]) == (
        "torch",
        "float32",
        "cpu",
        "0.1.0",
    )
    assert fields["items"].startswith("32 from ") and fields["items"].endswith("oct.parquet")
    assert fields["clustering"].startswith("kmeans on sklearn, k = 4 in ")
    stamp = head.find("time").attrs["datetime"]
    assert fields["created"] == stamp and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    made = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert report.made_at - timedelta(seconds=1) <= made <= datetime.now(UTC)


def test_header_says_what_a_file_does_not_record(oct_file: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(oct_file).replace_schema_metadata({}), bare)
    out = tmp_path / "r.html"
    assert run(["report", "--parquet", str(bare), "--k", "2", "--out", str(out)]) == 0
    fields = {
        n.attrs["data-field"]: n.all_text()
        for n in parse(out.read_text()).find("section", id="provenance").find_all("dd")
    }
    assert fields["model"] == fields["device"] == "not recorded"
    assert "No ground truth" in out.read_text()


# -- a real browser -------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-headless-shell")


@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="no chromium on PATH (apt-get install chromium; .ci/run installs it, and under CI=true this test fails)",
)
def test_chromium_renders_every_label_colour(report: Report, tmp_path: Path) -> None:
    from PIL import Image

    assert CHROMIUM is not None, "CI=true and no chromium on PATH: .ci/run installs Debian's chromium"
    page, png = tmp_path / "r.html", tmp_path / "r.png"
    page.write_text(report.page)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}"]
    subprocess.run([*cmd, "--window-size=1400,2400", page.as_uri()], check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int16)
    assert pixels.std() > 20  # not a blank page
    for colour in LABEL_PALETTE[:4]:  # the four classes' dots and borders reach the screen
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.int16)
        assert (np.abs(pixels - rgb).max(axis=1) <= 6).sum() > 200, colour


class _FakeEmbedClient:
    """Stands in for `EmbedClient` in the server branch of the report's header."""

    info: ModelInfo | None = None

    def __init__(self, target: str, **options: object) -> None:
        self.target = target

    def __enter__(self) -> _FakeEmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def model_info(self) -> ModelInfo:
        if self.info is None:
            raise RemoteError(grpc.StatusCode.UNIMPLEMENTED, "no embedder here")
        return self.info


def test_header_against_a_server_asks_for_its_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import service.client

    monkeypatch.setattr(service.client, "EmbedClient", _FakeEmbedClient)
    args = argparse.Namespace(
        parquet=None, server="host:1", collection="oct", features="embedding", timeout=5.0, token=None
    )
    _FakeEmbedClient.info = ModelInfo(
        backbone="efficientnet_lite2",
        embedding_dim=1280,
        input_size=260,
        precision="float16",
        device="cuda:0",
        decode_backend="dali",
        resize="squash",
        pad="zero",
        version="0.2.0",
        runtime="torch",
    )
    p = cli_analysis._report_provenance(args)
    assert (p.model, p.dim, p.runtime, p.precision, p.device, p.version) == (
        "efficientnet_lite2",
        1280,
        "torch",
        "float16",
        "cuda:0",
        "0.2.0",
    )
    assert p.source.startswith("collection oct on host:1")
    _FakeEmbedClient.info = None
    p = cli_analysis._report_provenance(args)
    assert p.model == "" and p.source.startswith("collection oct") and "no model info" in capsys.readouterr().err
    args.features, args.raw_size, args.raw_pca = "raw", 64, 16
    assert cli_analysis._report_provenance(args).features == "raw pixels (64x64 grayscale, PCA to 16)"
