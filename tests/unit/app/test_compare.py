"""`service.app.compare` on the 32 real OCT scans: each row's numbers are those of the existing cluster/probe code on
the same vectors, the raw row is what a scikit-learn pipeline written here gives, the padding variants pad as named
and give different vectors; bad grids are refused before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.analysis.cluster import ClusterParams, cluster
from service.analysis.density import DEFAULT_N_INIT
from service.analysis.evaluate import run_probe
from service.app.compare import CompareGrid, CompareOptions, CompareTable, Setting, run_compare
from service.embedding.engine import Engine
from service.errors import ConfigError, InvalidRequestError
from tests.conftest import OCT_DIR, cpu_config, encode

PATIENT = r"[A-Z]+-(\d+)-"
FOLDS = 4


def _patients(keys: list[str]) -> list[str]:
    return [re.search(PATIENT, k).group(1) for k in keys]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def table() -> CompareTable:
    grid = CompareGrid(
        backbones=("efficientnet_lite0",),
        resizes=("squash", "letterbox"),
        pads=("zero", "edge"),
        features=("cnn", "raw"),
    )
    options = CompareOptions(folds=FOLDS, group_pattern=PATIENT, cluster_backend="sklearn", keep_vectors=True)
    lines: list[str] = []
    t = run_compare(OCT_DIR, grid, options, base=cpu_config(), progress=lines.append)
    assert lines[0].startswith("32 images in 4 classes") and any("[4/4] raw pixels" in line for line in lines)
    return t


def _row(table: CompareTable, name: str):  # type: ignore[no-untyped-def]
    rows = [r for r in table.rows if r.setting.name == name]
    assert len(rows) == 1, [r.setting.name for r in table.rows]
    return rows[0]


def test_the_grid_has_one_row_per_distinct_setting(table: CompareTable) -> None:
    assert [r.setting.name for r in table.rows] == [
        "efficientnet_lite0 squash",
        "efficientnet_lite0 letterbox/zero",
        "efficientnet_lite0 letterbox/edge",
        "raw pixels",
    ]
    assert table.images == 32 and table.classes == {"CNV": 8, "DME": 8, "DRUSEN": 8, "NORMAL": 8}
    assert table.chance == 0.25
    for r in table.rows:
        assert r.n == 32 and not r.failed and r.seconds > 0 and r.images_per_second > 0
        assert r.kmeans_backend == "sklearn" and r.probe_folds == FOLDS
    assert [r.dim for r in table.rows] == [1280, 1280, 1280, 64 * 64]


def test_a_cnn_row_equals_the_existing_cluster_and_probe_code(
    table: CompareTable, oct_embeddings: np.ndarray, oct_files: list[Path], oct_labels: list[str]
) -> None:
    row = _row(table, "efficientnet_lite0 squash")
    assert row.vectors is not None
    # Its vectors are the session engine's (the same default config, embedded separately, in another order).
    order = {f.relative_to(OCT_DIR).as_posix(): i for i, f in enumerate(oct_files)}
    np.testing.assert_allclose(row.vectors, oct_embeddings[[order[k] for k in row.keys]], atol=1e-5)
    truth = [k.split("/")[0] for k in row.keys]
    assert sorted(truth) == sorted(oct_labels)
    km = cluster(row.vectors, ClusterParams(k=4, seed=0, backend="sklearn"), truth=truth)
    for m in ("accuracy", "nmi", "ari"):
        assert row.kmeans[m] == pytest.approx(km.metrics[m], abs=1e-12)
    probe = run_probe(row.vectors, truth, folds=FOLDS, groups=_patients(row.keys), seed=0)
    assert row.probe_accuracy == pytest.approx(probe.accuracy, abs=1e-12)
    # And the CNN features beat the pixels on both (the README's claim, on this sample).
    raw = _row(table, "raw pixels")
    assert row.kmeans["accuracy"] > raw.kmeans["accuracy"] and row.probe_accuracy > raw.probe_accuracy


def _hungarian(truth: list[str], labels: np.ndarray) -> float:
    classes = sorted(set(truth))
    counts = np.zeros((labels.max() + 1, len(classes)))
    for t, c in zip(truth, labels, strict=True):
        counts[c, classes.index(t)] += 1
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(truth))


def test_the_raw_row_equals_a_sklearn_pipeline(table: CompareTable) -> None:
    row = _row(table, "raw pixels")
    keys = row.keys
    truth = [k.split("/")[0] for k in keys]
    pixels = np.stack(
        [
            np.asarray(
                Image.open(OCT_DIR / k).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float32
            ).ravel()
            / 255.0
            for k in keys
        ]
    )
    np.testing.assert_array_equal(row.vectors, pixels)
    # K-means on 16 principal components (what `cluster --features raw` does).
    reduced = PCA(n_components=16, random_state=0).fit_transform(pixels)
    labels = KMeans(n_clusters=4, n_init=DEFAULT_N_INIT, max_iter=100, random_state=0).fit_predict(reduced)
    assert row.kmeans["accuracy"] == pytest.approx(_hungarian(truth, labels), abs=1e-12)
    assert row.kmeans["nmi"] == pytest.approx(normalized_mutual_info_score(truth, labels), abs=1e-12)
    assert row.kmeans["ari"] == pytest.approx(adjusted_rand_score(truth, labels), abs=1e-12)
    # The probe on every pixel, patients kept on one side of each split (what `probe --features raw` does).
    y = np.asarray(truth)
    correct = 0
    folds = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    for train, test in folds.split(pixels, y, _patients(keys)):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(pixels[train], y[train])
        correct += int((model.predict(pixels[test]) == y[test]).sum())
    assert row.probe_accuracy == pytest.approx(correct / len(keys), abs=1e-12)


def test_padding_variants_give_different_vectors(table: CompareTable) -> None:
    squash, zero, edge = (
        _row(table, n)
        for n in ("efficientnet_lite0 squash", "efficientnet_lite0 letterbox/zero", "efficientnet_lite0 letterbox/edge")
    )
    assert squash.keys == zero.keys == edge.keys
    assert squash.vectors is not None and zero.vectors is not None and edge.vectors is not None
    # Half the scans are 768x496 (a quarter of the letterboxed frame is padding), the rest 512x496 (a few rows).
    for a, b in ((zero, edge), (squash, zero), (squash, edge)):
        cos = (a.vectors * b.vectors).sum(axis=1)  # type: ignore[operator]
        assert np.all(cos < 0.9999) and np.median(cos) < 0.999, (a.setting.name, b.setting.name, cos.min())


# -- what each pad mode puts in the frame ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mean_pool_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny scripted model (mean colour per image): engines load at once, and the frames are what we check."""

    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path_factory.mktemp("models") / "mean.ts"
    torch.jit.script(MeanColour()).save(str(path))
    return f"torchscript:{path}"


def _frames(model: str, data: bytes, pad: str) -> np.ndarray:
    """The (3, 224, 224) frame the engine feeds the model for `data`, back in 0..255."""
    with Engine.from_config(cpu_config(backbone__model=model, decode__resize="letterbox", decode__pad=pad)) as eng:
        batch = eng.prepare([data]).batch
        assert batch is not None
        spec = eng.backbone.spec
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return ((batch[0].float().cpu() * std + mean) * 255.0).numpy()


def _wide_image() -> Image.Image:
    """96x48 (2:1): red ramps left to right, green top to bottom, blue a checker, so every border row differs."""
    yy, xx = np.mgrid[0:48, 0:96]
    rgb = np.stack([xx * 255 // 95, 40 + yy * 4, ((xx // 8 + yy // 8) % 2) * 200 + 20], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.mark.parametrize("source", ["synthetic 96x48 png", "oct 768x496 jpeg"])
def test_each_pad_mode_pads_as_named(mean_pool_model: str, oct_files: list[Path], source: str) -> None:
    if source.startswith("synthetic"):
        data, (h, w) = encode(_wide_image(), "PNG"), (48, 96)
    else:
        wide = next(f for f in oct_files if Image.open(f).size == (768, 496))
        data, (h, w) = wide.read_bytes(), (496, 768)
    inner_h = round(h * 224 / w)
    top = (224 - inner_h) // 2
    bottom = top + inner_h  # first padded row below the image
    assert top >= 20
    frames = {pad: _frames(mean_pool_model, data, pad) for pad in ("zero", "white", "edge")}
    inside = frames["zero"][:, top:bottom]
    assert inside.std() > 10  # a real picture in the middle...
    for pad in ("white", "edge"):  # ...the same whatever the padding
        np.testing.assert_allclose(frames[pad][:, top:bottom], inside, atol=1e-3)
    for region in (slice(0, top), slice(bottom, 224)):
        np.testing.assert_allclose(frames["zero"][:, region], 0.0, atol=1e-3)
        np.testing.assert_allclose(frames["white"][:, region], 255.0, atol=1e-3)
    # Edge: every padded row repeats the nearest image row, which is not a constant colour.
    edge = frames["edge"]
    np.testing.assert_allclose(edge[:, :top], np.repeat(inside[:, :1], top, axis=1), atol=1e-3)
    np.testing.assert_allclose(edge[:, bottom:], np.repeat(inside[:, -1:], 224 - bottom, axis=1), atol=1e-3)
    assert edge[:, 0].std() > 1 and not np.allclose(edge[:, 0], edge[:, -1], atol=1)


# -- the grid and its errors ----------------------------------------------------------------------------------------


def test_settings_drop_what_does_not_apply() -> None:
    grid = CompareGrid(
        backbones=("efficientnet_lite0", "efficientnet_lite2", "efficientnet_lite0"),
        resizes=("squash", "letterbox"),
        pads=("zero", "white", "edge"),
        features=("raw", "cnn"),
    )
    names = [s.name for s in grid.settings()]
    assert names == [
        "efficientnet_lite0 squash",
        "efficientnet_lite0 letterbox/zero",
        "efficientnet_lite0 letterbox/white",
        "efficientnet_lite0 letterbox/edge",
        "efficientnet_lite2 squash",
        "efficientnet_lite2 letterbox/zero",
        "efficientnet_lite2 letterbox/white",
        "efficientnet_lite2 letterbox/edge",
        "raw pixels",
    ]
    assert CompareGrid(features=("raw",)).settings() == [Setting(features="raw")]
    assert Setting(features="cnn", backbone="torchscript:/x/y/resnet50.ts", resize="squash").name == (
        "torchscript:resnet50.ts squash"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pads": ("zero", "red")}, "pad 'red' is not one of zero, white, edge"),
        ({"resizes": ("crop",)}, "resize 'crop' is not one of squash, letterbox"),
        ({"features": ("cnn", "hog")}, "features 'hog' is not one of cnn, raw"),
        ({"features": ()}, "the features list is empty"),
        ({"backbones": ("efficientnet_lite0", "")}, "a backbone name is empty"),
        ({"pads": ("zero", "edge")}, "only apply to letterbox resizing"),
    ],
)
def test_bad_grid_values_are_refused(kwargs: dict[str, tuple[str, ...]], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        CompareGrid(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seeds": 0}, "seeds=0"),
        ({"folds": 1}, "folds=1"),
        ({"raw_pca": -1}, "raw_pca=-1"),
        ({"group_pattern": "(["}, "not a valid regex"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        CompareOptions(**kwargs)  # type: ignore[arg-type]


def test_unknown_backbones_and_unlabelled_directories_fail_before_any_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backbone 'resnet50' is unknown; use one of efficientnet_lite0"):
        run_compare(OCT_DIR, CompareGrid(backbones=("resnet50",)))
    with pytest.raises(ConfigError, match="is not a file; give the path of a TorchScript model"):
        run_compare(OCT_DIR, CompareGrid(backbones=(f"torchscript:{tmp_path / 'missing.ts'}",)))
    (tmp_path / "CNV").mkdir()
    (tmp_path / "loose.png").write_bytes(encode(_wide_image(), "PNG"))
    (tmp_path / "CNV" / "a.png").write_bytes(encode(_wide_image(), "PNG"))
    with pytest.raises(InvalidRequestError, match="not in a class folder"):
        run_compare(tmp_path, CompareGrid(features=("raw",)))
    (tmp_path / "loose.png").unlink()
    with pytest.raises(InvalidRequestError, match="one class folder"):
        run_compare(tmp_path, CompareGrid(features=("raw",)))
    with pytest.raises(InvalidRequestError, match="does not match key"):
        run_compare(OCT_DIR, CompareGrid(features=("raw",)), CompareOptions(group_pattern=r"patient-(\d+)"))
