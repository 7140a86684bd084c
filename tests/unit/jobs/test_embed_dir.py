"""The directory job: Parquet layout, labels, failures, resume after an interruption."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.embedding.engine import Engine
from service.jobs.embed_dir import EmbedJobOptions, FileItem, JobError, find_images, parts_dir, run_embed_job
from service.types import Embedded, ModelInfo


def _read(out: Path) -> dict[str, tuple[str, str | None, np.ndarray]]:
    table = pq.read_table(out)
    rows = table.to_pylist()
    return {r["key"]: (r["path"], r["label"], np.asarray(r["embedding"], np.float32)) for r in rows}


@pytest.fixture()
def tree(tmp_path: Path, oct_files: list[Path]) -> Path:
    """A small tree: two classes of real scans, one at the top, a corrupt file, a non-image, a hidden file."""
    root = tmp_path / "images"
    for f in oct_files[:2] + oct_files[8:10]:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f.parent.name / f.name)
    shutil.copy(oct_files[16], root / "TOP.JPEG")
    (root / "CNV" / "broken.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "CNV" / ".hidden.jpeg").write_bytes(oct_files[0].read_bytes())
    return root


def test_find_images_walks_recursively_case_insensitive(tree: Path) -> None:
    items = list(find_images(tree))
    keys = [i.key for i in items]
    assert keys == sorted(keys)
    assert "TOP.JPEG" in keys and "CNV/broken.jpg" in keys
    assert not any("notes" in k or ".hidden" in k for k in keys)
    labels = {i.key: i.label for i in items}
    assert labels["TOP.JPEG"] is None
    assert labels["CNV/broken.jpg"] == "CNV"
    assert all(label is None for label in (i.label for i in find_images(tree, labels=False)))


def test_job_writes_parquet_and_lists_failures(engine: Engine, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "emb.parquet"
    summary = run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    assert (summary.found, summary.embedded, summary.failed) == (6, 5, 1)
    rows = _read(out)
    assert set(rows) == {"CNV/" + p.name for p in (tree / "CNV").glob("CNV-*")} | {
        "DME/" + p.name for p in (tree / "DME").iterdir()
    } | {"TOP.JPEG"}
    path, label, vector = rows["TOP.JPEG"]
    assert label is None and Path(path) == (tree / "TOP.JPEG").resolve()
    assert vector.dtype == np.float32 and vector.shape == (1280,)
    # Independent check: the stored vector is the engine's vector for that file's bytes.
    (expected,) = engine.embed([(tree / "TOP.JPEG").read_bytes()])
    assert expected.vector is not None
    np.testing.assert_allclose(vector, expected.vector, atol=1e-6)
    assert {r[1] for k, r in rows.items() if k != "TOP.JPEG"} == {"CNV", "DME"}
    meta = pq.read_schema(out).metadata
    assert meta[b"embedserve.model"] == b"efficientnet_lite0"
    with summary.failures_path.open() as handle:  # type: ignore[union-attr]
        failures = list(csv.DictReader(handle))
    assert [(f["key"], f["reason"]) for f in failures] == [("CNV/broken.jpg", "invalid_image")]
    assert not parts_dir(out).exists()


def test_rerun_skips_what_is_done(engine: Engine, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    first = _read(out)
    shutil.copy(tree / "TOP.JPEG", tree / "DME" / "new.jpeg")
    summary = run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    assert (summary.already_done, summary.embedded, summary.failed) == (5, 1, 1)
    second = _read(out)
    assert set(second) == set(first) | {"DME/new.jpeg"}
    for key, (_, _, vector) in first.items():
        np.testing.assert_array_equal(second[key][2], vector)


class _InterruptingEmbedder:
    """Wraps the engine and raises KeyboardInterrupt (as Ctrl-C would) after `after` images."""

    def __init__(self, engine: Engine, after: int) -> None:
        self.engine = engine
        self.after = after

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def embed_iter(self, items: Iterable[FileItem]) -> Iterator[Embedded[FileItem]]:
        for n, result in enumerate(self.engine.embed_iter(items)):
            if n == self.after:
                raise KeyboardInterrupt
            yield result


def test_interrupted_run_is_resumable(engine: Engine, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    options = EmbedJobOptions(root=tree, out=out, progress=False, part_rows=2)
    with pytest.raises(KeyboardInterrupt):
        run_embed_job(_InterruptingEmbedder(engine, after=3), options)
    assert not out.exists()
    parts = sorted(parts_dir(out).glob("part-*.parquet"))
    kept = {k for p in parts for k in pq.read_table(p).column("key").to_pylist()}
    assert len(kept) >= 2  # every image embedded before the interrupt was flushed
    summary = run_embed_job(engine, options)
    assert summary.already_done == len(kept)
    assert summary.embedded + summary.already_done == 5
    assert len(_read(out)) == 5
    assert not parts_dir(out).exists()


def test_output_from_another_model_is_refused(engine: Engine, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    table = pq.read_table(out)
    meta = dict(table.schema.metadata)
    meta[b"embedserve.model"] = b"efficientnet_lite2"
    pq.write_table(table.replace_schema_metadata(meta), out)
    with pytest.raises(JobError, match="efficientnet_lite2"):
        run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))


def test_missing_directory_is_a_clear_error(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="not a directory"):
        run_embed_job(engine, EmbedJobOptions(root=tmp_path / "nope", out=tmp_path / "x.parquet", progress=False))


BAD_DIR = Path(__file__).resolve().parents[2] / "data" / "bad"
# The crash inputs that the job walks (its extensions), and two more corpus files.
CRASH_FILES = {
    "crash-tiff-stripoffsets-double.tif": "invalid_image",
    "trunc-jpeg-7000x7000-35k-eoi.jpg": "invalid_image",
    "odd-gif-named-jpg.jpg": "unsupported_image",
    "bomb-png-8000x8000-zeros.png": "image_too_large",
}


def test_crashing_decodes_are_failures_of_their_files_and_a_rerun_goes_on(
    engine: Engine, tree: Path, tmp_path: Path
) -> None:
    for name in CRASH_FILES:
        shutil.copy(BAD_DIR / name, tree / "DME" / name)
    out = tmp_path / "emb.parquet"
    summary = run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    expected_failures = {f"DME/{n}": r for n, r in CRASH_FILES.items()} | {"CNV/broken.jpg": "invalid_image"}
    assert (summary.found, summary.embedded, summary.failed) == (10, 5, 5)
    with summary.failures_path.open() as handle:  # type: ignore[union-attr]
        failures = {f["key"]: f["reason"] for f in csv.DictReader(handle)}
    assert failures == expected_failures
    assert {k for k, _, _ in summary.failures} == set(expected_failures)
    assert len(_read(out)) == 5
    rerun = run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    assert (rerun.already_done, rerun.embedded, rerun.failed) == (5, 0, 5)
    assert len(_read(out)) == 5
