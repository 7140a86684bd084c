"""The torch clustering backends' internals, on the CPU: k-means++ seeding against the naive O(n·d·k²) definition,
DBSCAN in bounded memory against scikit-learn, and a cuML that does not import falling back to torch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN

from service.analysis import cluster as cl
from service.analysis import torch_backend as tb
from service.errors import ConfigError


def naive_kmeans_pp(t: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """k-means++ by its definition: every step, each point's distance to all chosen centres, the minimum taken."""
    n = t.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    x = t.double()
    for _ in range(1, k):
        d2 = torch.cdist(x, x[chosen]).pow(2).min(dim=1).values
        total = float(d2.sum())
        chosen.append(
            int(torch.multinomial(d2 / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
    return chosen


@pytest.mark.parametrize("k", [1, 5, 40])
def test_kmeans_pp_draws_the_same_centres_as_the_definition(k: int) -> None:
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(8, 16)) * 6
    x = torch.from_numpy((centres[rng.integers(0, 8, 600)] + rng.normal(size=(600, 16))).astype(np.float32))
    got = tb._kmeans_pp(x, k, torch.Generator().manual_seed(3))
    want = naive_kmeans_pp(x, k, torch.Generator().manual_seed(3))
    assert torch.equal(got, x[want])


def test_kmeans_pp_compares_each_point_with_the_newest_centre_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The work per step is one pass over the data (n·d), not one per chosen centre (n·d·k)."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    seen: list[int] = []
    real = tb._sq_dist_to

    def counting(t: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen.append(c.numel())
        return real(t, sq, c)

    monkeypatch.setattr(tb, "_sq_dist_to", counting)
    tb._kmeans_pp(x, 25, torch.Generator().manual_seed(1))
    assert seen == [8] * 25  # one centre (d numbers) per step


def _blobs(n: int = 900, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 6)) * 8
    noise = rng.uniform(-20, 20, size=(n // 10, 6))
    return np.concatenate([centres[rng.integers(0, 5, n)] + rng.normal(size=(n, 6)), noise]).astype(np.float32)


@pytest.mark.parametrize("budget_rows", [16, 100, 4096])
def test_dbscan_in_bounded_blocks_matches_sklearn(budget_rows: int) -> None:
    x = _blobs()
    n = x.shape[0]
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    for eps, ms in ((1.5, 5), (3.0, 10)):
        ref = DBSCAN(eps=eps, min_samples=ms).fit(x)
        want = np.asarray(ref.labels_, np.int64)
        got = cl.dbscan_torch(x, eps, ms, device="cpu", memory_bytes=budget_rows * n * tb._DBSCAN_BYTES_PER_CELL)
        core = np.zeros(n, bool)
        core[ref.core_sample_indices_] = True
        assert ((got == -1) == (want == -1)).all()
        # Core points: scikit-learn's labels exactly (clusters numbered by their first core point).
        assert got[core].tolist() == want[core].tolist()
        # Border points: the cluster of the nearest core point within eps (scikit-learn takes whichever reaches
        # it first, so a border point between two clusters may differ from it; the definition here is ours).
        for i in np.nonzero(~core & (want != -1))[0]:
            near = np.where(core & (d2[i] <= eps**2), d2[i], np.inf)
            assert got[i] == want[int(np.argmin(near))]


def test_dbscan_over_its_memory_budget_refuses_with_what_to_do() -> None:
    x = _blobs(200)
    with pytest.raises(ConfigError, match=r"budget; reduce the vectors .* cuml or sklearn"):
        cl.dbscan_torch(x, 1.0, 5, device="cpu", memory_bytes=1000)


def test_dbscan_keeps_no_edge_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays within one block: the pairs merged at a time never exceed the block's cells."""
    x = _blobs(400)
    n = x.shape[0]
    sizes: list[int] = []
    real = tb._union

    def spy(parent: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sizes.append(a.numel())
        return real(parent, a, b)

    monkeypatch.setattr(tb, "_union", spy)
    cl.dbscan_torch(x, 50.0, 3, device="cpu", memory_bytes=32 * n * tb._DBSCAN_BYTES_PER_CELL)  # every pair within eps
    assert len(sizes) == -(-n // 32) and max(sizes) <= 32 * n


def test_cuml_that_fails_to_import_falls_back_to_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "cuml"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('libcudart.so.13: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cuml", raising=False)
    monkeypatch.setattr(cl, "cuda_available", lambda: True)
    cl._cuml_import_error.cache_clear()
    try:
        ok, why = cl.backend_available("cuml")
        assert not ok and "libcudart.so.13" in why
        assert cl.resolve_backend("kmeans") == "torch"
        assert cl.resolve_backend("dbscan") == "torch"
        with pytest.raises(cl.BackendUnavailableError, match="does not import"):
            cl.resolve_backend("kmeans", "cuml")
    finally:
        cl._cuml_import_error.cache_clear()
