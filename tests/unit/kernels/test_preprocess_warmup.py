"""`kernels.preprocess.warmup` launches the kernel the way real batches will (packed, and one launch per image at
an offset into the output), and launches nothing where the settings run the reference.

On CPU the launches go through the Triton interpreter (`backend="triton"`); on a GPU they compile.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels import preprocess as P

SIZE = (16, 12)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every launch of the preprocess kernel: its grid and the output slice it writes (the launch still runs)."""
    kernel = P._preprocess_kernel
    seen: list[dict[str, Any]] = []
    original = kernel.run

    def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        out = args[2]
        seen.append({"grid": tuple(grid), "rows": out.shape[0], "offset": out.storage_offset(), "dtype": out.dtype})
        return original(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel, "run", run)  # an instance attribute: `kernel[grid](...)` calls it
    return seen


@pytest.mark.parametrize(("policy", "pad"), [("squash", "zero"), ("letterbox", "edge")])
def test_warmup_launches_packed_and_at_an_offset(device: str, launches: list[dict[str, Any]], policy: str, pad: str):
    made = P.warmup(torch.device(device), SIZE, policy=policy, pad=pad, backend="triton")  # type: ignore[arg-type]
    assert made == 3 == len(launches)
    packed, first, second = launches
    assert packed["grid"][0] == 2 and packed["rows"] == 2 and packed["offset"] == 0
    assert first["grid"][0] == second["grid"][0] == 1
    assert (first["offset"], second["offset"]) == (0, 3 * SIZE[0] * SIZE[1])  # the second writes at an offset
    assert {launch["dtype"] for launch in launches} == {torch.float32}


def test_warmup_covers_the_dtype_it_is_given(device: str, launches: list[dict[str, Any]]) -> None:
    assert P.warmup(torch.device(device), SIZE, dtype=torch.float16, backend="triton") == 3
    assert {launch["dtype"] for launch in launches} == {torch.float16}


def test_warmup_does_nothing_where_the_reference_runs(launches: list[dict[str, Any]]) -> None:
    cpu = torch.device("cpu")
    assert P.warmup(cpu, SIZE) == 0  # auto on CPU tensors: the reference, even under the interpreter
    assert P.warmup(cpu, SIZE, backend="torch") == 0
    assert P.warmup(cpu, SIZE, dtype=torch.float64, backend="auto") == 0  # no kernel writes float64
    assert launches == []


def test_warmup_refuses_settings_preprocess_would_refuse() -> None:
    with pytest.raises(ValueError, match="pad mode"):
        P.warmup(torch.device("cpu"), SIZE, policy="letterbox", pad="mirror")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        P.warmup(torch.device("cpu"), (0, 12))
