"""The fused preprocess kernel against the per-image torch reference (F.interpolate with antialias).

Tolerances: float32 output within 1e-4 absolute of the reference (inputs are 0..255, outputs about
-2.1..2.7, so this is ~0.006 grey levels); float16/bfloat16 output within 1e-4 plus one ulp of the
float32 reference (relative 2**-10 / 2**-7: a GPU rounds to nearest, the interpreter truncates to bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kernels import preprocess as P
from kernels._triton import is_interpreted

ATOL_FP32 = 1e-4
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
OCT_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "oct-sample"
SIZE = (16, 12)


def _ragged(device: str, layout: str = "chw") -> list[torch.Tensor]:
    """Odd sizes: shrink, enlarge, 1x1, one pixel wide and tall, gray 2-D and (1, H, W), exact size."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 37, 23), (11, 50), (1, 1, 1), (3, 5, 1), (1, 1, 9), (3, 6, 7), (3, *SIZE), (3, 41, 30), (1, 20, 13)]
    images = []
    for shape in shapes:
        image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        if layout == "hwc" and image.dim() == 3:
            image = image.permute(1, 2, 0).contiguous()
        images.append(image.to(device))
    return images


def _assert_close(out: torch.Tensor, ref32: torch.Tensor) -> None:
    assert out.shape == ref32.shape
    diff = (out.float().cpu() - ref32.float().cpu()).abs()
    bound = ATOL_FP32 + ref32.float().cpu().abs() * ULP.get(out.dtype, 0.0)
    assert bool((diff <= bound).all()), f"max abs error {diff.max().item():.3g}"


def test_kernel_mode(device: str) -> None:
    assert is_interpreted(P._preprocess_kernel) == (device == "cpu")


@pytest.mark.parametrize(
    ("policy", "pad"), [("squash", "zero"), ("letterbox", "zero"), ("letterbox", "white"), ("letterbox", "edge")]
)
def test_matches_reference(device: str, policy: str, pad: str) -> None:
    images = _ragged(device)
    out = P._preprocess_triton(images, SIZE, policy=policy, pad=pad)  # type: ignore[arg-type]
    ref = P.preprocess_reference(images, SIZE, policy=policy, pad=pad)  # type: ignore[arg-type]
    assert out.dtype == torch.float32
    assert out.device.type == device
    _assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_channels_last(device: str, dtype: torch.dtype) -> None:
    images = _ragged(device)
    out = P._preprocess_triton(images, SIZE, policy="letterbox", pad="edge", dtype=dtype, channels_last=True)
    ref = P.preprocess_reference(images, SIZE, policy="letterbox", pad="edge")
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_close(out, ref)


def test_hwc_layout_and_strided_inputs(device: str) -> None:
    chw = _ragged(device)
    hwc = _ragged(device, layout="hwc")
    # A non-contiguous view is packed like any other image.
    hwc[0] = chw[0].permute(1, 2, 0)
    out = P._preprocess_triton(hwc, SIZE, policy="letterbox", pad="white", layout="hwc")
    ref = P.preprocess_reference(chw, SIZE, policy="letterbox", pad="white")
    _assert_close(out, ref)
    _assert_close(P.preprocess_reference(hwc, SIZE, policy="letterbox", pad="white", layout="hwc"), ref)


def test_custom_mean_std_and_enlarging(device: str) -> None:
    images = _ragged(device)[:3]
    kwargs = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 1.0)}
    out = P._preprocess_triton(images, (21, 17), **kwargs)  # type: ignore[arg-type]
    _assert_close(out, P.preprocess_reference(images, (21, 17), **kwargs))  # type: ignore[arg-type]


def test_gray_is_repeated(device: str) -> None:
    gray = torch.arange(30, dtype=torch.uint8).reshape(5, 6).to(device)
    out = P._preprocess_triton([gray], (4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.equal(out[0, 0], out[0, 1])
    assert torch.equal(out[0, 0], out[0, 2])


def test_real_oct_scan_large_downscale(device: str) -> None:
    path = sorted(OCT_SAMPLE.glob("*/*.jpeg"))[0]
    with Image.open(path) as im:
        array = np.asarray(im.convert("L"))
    # A central crop keeps the interpreter quick while shrinking ~8x with real OCT texture.
    h, w = array.shape
    image = torch.from_numpy(array[h // 2 - 48 : h // 2 + 48, w // 2 - 40 : w // 2 + 40].copy()).to(device)
    out = P._preprocess_triton([image], (12, 9), policy="letterbox", pad="edge")
    _assert_close(out, P.preprocess_reference([image], (12, 9), policy="letterbox", pad="edge"))


def test_public_function_dispatch(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _ragged(device)[:2]
    ref = P.preprocess_reference(images, SIZE)
    _assert_close(P.preprocess_batch(images, SIZE, backend="triton"), ref)
    _assert_close(P.preprocess_batch(images, SIZE, backend="torch"), ref)
    if device == "cpu":
        # CPU tensors take the reference under "auto", even under the interpreter.
        def fail(*args: object, **kwargs: object) -> None:
            raise AssertionError("the kernel ran for CPU tensors")

        monkeypatch.setattr(P, "_preprocess_triton", fail)
        _assert_close(P.preprocess_batch(images, SIZE), ref)
    with pytest.raises(ValueError, match="backend"):
        P.preprocess_batch(images, SIZE, backend="fast")  # type: ignore[arg-type]


def test_pack_groups_bound_the_copy() -> None:
    sizes = [10, 30, 25, 100, 5, 5]  # bytes of each uint8 image
    images = [torch.zeros(n, dtype=torch.uint8).view(1, 1, n) for n in sizes]
    groups = P.pack_groups(images, limit=40)
    assert [list(g) for g in groups] == [[0, 1], [2], [3], [4, 5]]  # 100 > 40 runs alone
    assert all(sum(sizes[i] for i in g) <= 40 or len(g) == 1 for g in groups)
    assert [list(g) for g in P.pack_groups(images)] == [list(range(6))]


def test_a_lone_image_is_packed_without_a_copy(device: str) -> None:
    image = _ragged(device)[0]
    flat, _ = P._pack([image], SIZE, "squash", "chw")
    assert flat.data_ptr() == image.data_ptr()  # a view of its storage: no second copy of its pixels
    both, _ = P._pack(_ragged(device)[:2], SIZE, "squash", "chw")
    assert both.numel() == sum(i.numel() for i in _ragged(device)[:2])


@pytest.mark.parametrize("pack_bytes", [1, 2000])
def test_several_launches_match_one(device: str, pack_bytes: int) -> None:
    images = _ragged(device)
    assert len(P.pack_groups(images, pack_bytes)) > 1
    ref = P.preprocess_reference(images, SIZE, policy="letterbox", pad="edge")
    out = P._preprocess_triton(images, SIZE, policy="letterbox", pad="edge", channels_last=True, pack_bytes=pack_bytes)
    _assert_close(out, ref)
    one = P._preprocess_triton(images, SIZE, policy="letterbox", pad="edge", channels_last=True)
    assert torch.equal(out, one)


def test_rejects_bad_inputs(device: str) -> None:
    with pytest.raises(ValueError, match="at least one"):
        P._preprocess_triton([], SIZE)
    with pytest.raises(ValueError, match="uint8"):
        P._preprocess_triton([torch.zeros(3, 4, 4, device=device)], SIZE)
    with pytest.raises(ValueError, match="C in 1 or 3"):
        P._preprocess_triton([torch.zeros(2, 4, 4, dtype=torch.uint8, device=device)], SIZE)
    with pytest.raises(ValueError, match="empty image"):
        P._preprocess_triton([torch.zeros(3, 0, 4, dtype=torch.uint8, device=device)], SIZE)
    with pytest.raises(ValueError, match="pad mode"):
        P._preprocess_triton([torch.zeros(3, 4, 4, dtype=torch.uint8, device=device)], SIZE, pad="red")  # type: ignore[arg-type]


def test_compiles_for_gpu(gpu_compile_report: dict[str, str]) -> None:
    results = {name: status for name, status in gpu_compile_report.items() if name.startswith("_preprocess_kernel")}
    assert results
    assert all(status == "ok" for status in results.values()), results
