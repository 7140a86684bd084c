"""`embedserve embed DIR --server`: the directory job through a server writes the offline job's Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from service.client import RemoteEmbedder
from service.jobs.embed_dir import EmbedJobOptions, run_embed_job

OCT_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "oct-sample"


def test_remote_job_writes_the_same_parquet_as_the_offline_job(start_server, engine, tmp_path: Path) -> None:
    server = start_server()
    offline_out, remote_out = tmp_path / "offline.parquet", tmp_path / "remote.parquet"
    offline = run_embed_job(engine, EmbedJobOptions(root=OCT_SAMPLE, out=offline_out, progress=False))
    with RemoteEmbedder(server.target, batch_size=8, max_in_flight=2) as remote:
        summary = run_embed_job(remote, EmbedJobOptions(root=OCT_SAMPLE, out=remote_out, progress=False))
    assert offline.embedded == summary.embedded == 32 and summary.failed == 0

    a, b = pq.read_table(offline_out).sort_by("key"), pq.read_table(remote_out).sort_by("key")
    assert a.schema.equals(b.schema, check_metadata=True)
    for column in ("key", "path", "label"):
        assert a.column(column).to_pylist() == b.column(column).to_pylist()
    va = np.array(a.column("embedding").to_pylist(), dtype=np.float32)
    vb = np.array(b.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(va, vb, atol=1e-4, rtol=0)
