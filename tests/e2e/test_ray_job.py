"""The directory job on Ray Data, on a real two-node Ray cluster over loopback (1 CPU per node, 2 in all).

The reference is the local job (`run_embed_job` with the in-process engine) over the same tree: the Ray job must
write the same Parquet file. One cluster serves the module; the node-loss test kills its worker node and starts a
fresh one afterwards.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from ray.cluster_utils import Cluster

from service.client import EmbedClient
from service.embedding.engine import Engine
from service.jobs.embed_dir import EmbedJobOptions, FileItem, find_images, parts_dir, run_embed_job
from service.jobs.files import failures_file
from service.jobs.ray_job import EmbedActor, EngineFactory, RayEmbedder, RayJobOptions, ServerFactory, _input_blocks
from service.types import Embedded
from tests.e2e.conftest import OCT_SAMPLE, make_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

NODE: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
"""Each node: one CPU and the smallest object store Ray accepts comfortably, so the cluster starts in seconds."""
ROWS_PER_TASK = 4
CFG = make_config(backbone__device="cpu", decode__workers=1)
"""The config of every engine here: the local reference's, the actors' and the server's."""
BAD_KEY = "GEN/truncated.jpeg"


class TwoNodes:
    """The cluster and its (replaceable) worker node."""

    def __init__(self) -> None:
        self.cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        self.worker = self.cluster.add_node(**NODE)
        self.cluster.wait_for_nodes()

    def kill_worker(self) -> None:
        self.cluster.remove_node(self.worker, allow_graceful=False)

    def replace_worker(self) -> None:
        self.worker = self.cluster.add_node(**NODE)
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodes]:
    nodes = TwoNodes()
    ray.init(address=nodes.cluster.address, logging_level="WARNING")
    # Ray Data feeds the first actor that is up; a slow machine can finish the small tree on the head node before
    # the worker node's actor has built its engine, and the tests below need both nodes to embed.
    context = ray.data.DataContext.get_current()
    wait_before, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 240
    try:
        yield nodes
    finally:
        context.wait_for_min_actors_s = wait_before
        ray.shutdown()
        nodes.cluster.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 32 real scans in their class folders, plus generated images (top level and GEN/) and one truncated JPEG."""
    root = tmp_path_factory.mktemp("ray") / "images"
    shutil.copytree(OCT_SAMPLE, root)
    rng = np.random.default_rng(16)
    (root / "GEN").mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, size=(96 + 16 * i, 128, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG" if i % 2 else "JPEG")
        name = f"gen-{i}.{'png' if i % 2 else 'jpeg'}"
        (root / ("GEN" if i < 4 else ".") / name).write_bytes(buffer.getvalue())
    good = (root / "GEN" / "gen-0.jpeg").read_bytes()
    (root / BAD_KEY).write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine.from_config(CFG) as eng:
        yield eng


@pytest.fixture(scope="module")
def local_out(engine: Engine, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    summary = run_embed_job(engine, EmbedJobOptions(root=tree, out=out, progress=False))
    assert summary.failed == 1 and summary.embedded == len(find_images(tree)) - 1
    return out


def _ray_embedder(factory: EngineFactory | ServerFactory | None = None) -> RayEmbedder:
    factory = factory or EngineFactory(cfg=CFG)
    return RayEmbedder.create(factory, RayJobOptions(rows_per_task=ROWS_PER_TASK), batch_size=8)


def _failures(out: Path) -> list[tuple[str, str]]:
    with failures_file(out).open() as handle:
        return [(row["key"], row["reason"]) for row in csv.DictReader(handle)]


def assert_same_parquet(expected: Path, actual: Path) -> None:
    """Same schema and metadata, same keys (each once), paths and labels; vectors equal within float tolerance."""
    a, b = pq.read_table(expected), pq.read_table(actual)
    assert b.schema.equals(a.schema, check_metadata=True)
    keys = b.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key was written twice"
    a, b = a.sort_by("key"), b.sort_by("key")
    for column in ("key", "path", "label"):
        assert b.column(column).to_pylist() == a.column(column).to_pylist()
    va = np.array(a.column("embedding").to_pylist(), dtype=np.float32)
    vb = np.array(b.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vb, va, atol=1e-4, rtol=0)


def test_ray_job_writes_the_local_jobs_parquet(cluster: TwoNodes, tree: Path, local_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray.parquet"
    embedder = _ray_embedder()
    assert (embedder.plan.actors, embedder.plan.num_cpus, embedder.plan.num_gpus) == (2, 1, 0)
    summary = run_embed_job(embedder, EmbedJobOptions(root=tree, out=out, progress=False, part_rows=8))
    found = len(find_images(tree))
    assert (summary.found, summary.embedded, summary.failed) == (found, found - 1, 1)
    assert_same_parquet(local_out, out)
    assert pq.read_table(out).column("key").to_pylist() == sorted(pq.read_table(out).column("key").to_pylist())
    # The bad image failed alone, with the local job's reason, in the same side file.
    assert _failures(out) == _failures(local_out) == [(BAD_KEY, "invalid_image")]
    assert not parts_dir(out).exists()
    # Both nodes embedded, and every image once.
    assert sum(embedder.images_by_node.values()) == found - 1
    assert set(embedder.images_by_node) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # Re-running resumes: nothing left to embed but the failed image, which fails again.
    again = run_embed_job(embedder, EmbedJobOptions(root=tree, out=out, progress=False))
    assert (again.already_done, again.embedded, again.failed) == (found - 1, 0, 1)
    assert_same_parquet(local_out, out)


def test_engine_builds_inside_a_ray_actor(cluster: TwoNodes, engine: Engine) -> None:
    files = sorted(OCT_SAMPLE.rglob("*.jpeg"))[:3]
    items = [FileItem(key=f.name, path=f, label=f.parent.name) for f in files]
    (batch,) = _input_blocks(items, len(items))
    actor = ray.remote(num_cpus=1)(EmbedActor).remote(EngineFactory(cfg=CFG), 1)
    try:
        result = ray.get(actor.__call__.remote(batch), timeout=240)
    finally:
        ray.kill(actor)
    assert result.column("key").to_pylist() == [f.name for f in files]
    assert result.column("reason").to_pylist() == [None] * 3
    vectors = np.stack([np.frombuffer(v, dtype="<f4") for v in result.column("vector").to_pylist()])
    expected = np.stack([o.vector for o in engine.embed([f.read_bytes() for f in files])])  # type: ignore[misc]
    np.testing.assert_allclose(vectors, expected, atol=1e-4, rtol=0)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


class KillWorkerMidJob:
    """Delegates to a `RayEmbedder` and kills the worker node right after the first image that node embedded."""

    def __init__(self, inner: RayEmbedder, cluster: TwoNodes) -> None:
        self.inner = inner
        self.cluster = cluster
        self.worker_id = cluster.worker.node_id
        self.killed_after: int | None = None

    @property
    def info(self) -> Any:
        return self.inner.info

    def embed_iter(self, items: Iterable[FileItem]) -> Iterator[Embedded[FileItem]]:
        for count, result in enumerate(self.inner.embed_iter(items), start=1):
            yield result
            if self.killed_after is None and self.inner.images_by_node.get(self.worker_id):
                self.cluster.kill_worker()
                self.killed_after = count


def test_killing_a_worker_node_loses_and_duplicates_nothing(
    cluster: TwoNodes, tree: Path, local_out: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray.parquet"
    found = len(find_images(tree))
    killer = KillWorkerMidJob(_ray_embedder(), cluster)
    try:
        try:
            first = run_embed_job(killer, EmbedJobOptions(root=tree, out=out, progress=False, part_rows=4))
            finished = first.embedded + first.failed == found
        except Exception:  # the job may stop (what came back is kept in parts); the re-run must then finish it
            finished = False
        assert killer.killed_after is not None, "the worker node embedded nothing, so the test killed nothing"
        assert killer.killed_after < found, "the worker node was killed only after the job's last image"
        print(f"worker node killed after {killer.killed_after} of {found} images; the job finished: {finished}")
        if not finished:
            rerun = run_embed_job(_ray_embedder(), EmbedJobOptions(root=tree, out=out, progress=False))
            assert rerun.embedded + rerun.already_done == found - 1
    finally:
        cluster.replace_worker()
    assert_same_parquet(local_out, out)
    assert _failures(out) == [(BAD_KEY, "invalid_image")]


def test_store_through_a_server_from_ray(
    cluster: TwoNodes, start_server: Any, engine: Engine, tree: Path, local_out: Path, tmp_path: Path
) -> None:
    server = start_server(engine)
    factory = ServerFactory(target=server.target, client_options={"batch_size": 4, "store": True, "collection": "ray"})
    out = tmp_path / "ray.parquet"
    summary = run_embed_job(_ray_embedder(factory), EmbedJobOptions(root=tree, out=out, progress=False))
    found = len(find_images(tree))
    assert (summary.embedded, summary.failed) == (found - 1, 1)
    assert_same_parquet(local_out, out)
    expected = pq.read_table(local_out).sort_by("key")
    with EmbedClient(server.target) as client:
        stored = client.fetch_items(collection="ray")
    assert stored.keys == expected.column("key").to_pylist()
    labels = expected.column("label").to_pylist()
    assert [a.get("label") for a in stored.attributes] == labels
    np.testing.assert_allclose(
        stored.vectors, np.array(expected.column("embedding").to_pylist(), np.float32), atol=1e-4, rtol=0
    )


def test_cli_embed_with_ray_joins_the_cluster(cluster: TwoNodes, engine: Engine, tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "small"
    (root / "CNV").mkdir(parents=True)
    files = sorted((tree / "CNV").glob("*.jpeg"))[:3]
    for f in files:
        shutil.copy(f, root / "CNV" / f.name)
    (root / "bad.jpeg").write_bytes(b"not an image")
    out = tmp_path / "cli.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "embed", str(root), "--out", str(out), "--quiet",
         "--ray", cluster.cluster.address, "--device", "cpu", "--batch-size", "2"],
        env=os.environ | {"EMBEDSERVE_DECODE_WORKERS": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # one image failed: the local job's exit code
    assert "3 embedded, 1 failed, 0 already in" in proc.stderr
    assert "bad.jpeg: invalid_image" in proc.stderr
    table = pq.read_table(out)
    assert table.column("key").to_pylist() == [f"CNV/{f.name}" for f in files]
    assert table.column("label").to_pylist() == ["CNV"] * 3
    expected = np.stack([o.vector for o in engine.embed([f.read_bytes() for f in files])])  # type: ignore[misc]
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist(), np.float32), expected, atol=1e-4, rtol=0)
    assert _failures(out) == [("bad.jpeg", "invalid_image")]
