"""Batch preprocessing: ragged uint8 images -> one normalised NCHW float batch.

`preprocess_batch` is the public entry point. `preprocess_reference` is the plain-torch definition
of the operation; the fused Triton kernel (`_preprocess_triton`) must match it within tolerance
(max abs error <= 1e-4 on the normalised float32 output; tests/unit/kernels/test_preprocess_kernel.py).

Semantics (shared by every implementation):
- input images are uint8 tensors shaped (H, W) for grayscale, or (C, H, W) with C in {1, 3}
  (`layout="chw"`, the default) or (H, W, C) (`layout="hwc"`, as Pillow and DALI produce them);
- `squash` resizes to exactly `size` (aspect ratio not kept);
  `letterbox` scales by min(out_h / h, out_w / w), rounds the scaled size, centres the image and pads
  the rest with 0 (`zero`), 255 (`white`) or the nearest border pixel (`edge`), in pixel space;
- resizing is bilinear with half-pixel centres (align_corners=False), antialiased when shrinking
  (PyTorch's `F.interpolate(..., antialias=True)`: a triangle filter whose support grows with the
  downscale factor), computed in float32 without rounding back to uint8;
- grayscale is repeated to three channels; output = (x / 255 - mean) / std per channel.

The Triton kernel runs a ragged batch in as few launches as memory allows: consecutive images are packed
into one flat uint8 buffer per launch with a per-image table (offset, shape, strides, letterbox geometry), and
the grid is (image, output row tile, output column tile). The pack copies its images, so a launch packs at most
`PACK_BYTES` (the extra memory is one group's copy, not the batch's); an image larger than that is its own
group and is read in place, not copied.
"""

# Triton kernels name compile-time constants in capitals and take many positional arguments.
# ruff: noqa: N803, PLR0917

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from kernels._triton import TRITON_AVAILABLE, Backend, next_power_of_2, use_triton

logger = logging.getLogger(__name__)

ResizePolicy = Literal["squash", "letterbox"]
PadMode = Literal["zero", "white", "edge"]
ImageLayout = Literal["chw", "hwc"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Output dtypes the Triton kernel writes; other dtypes go through the reference."""

_PAD_CODES = {"zero": 0, "white": 1, "edge": 2}
# Per-image table columns: offset, C, H, W, stride_c, stride_h, stride_w, new_h, new_w, top, left, taps_y, taps_x.
_TABLE_COLS = 13
PACK_BYTES = 64 * 2**20
"""Most image bytes one kernel launch packs (copies) together; see the module docstring."""


def letterbox_geometry(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """Return (new_h, new_w, top, left) of an image scaled to fit inside (out_h, out_w), centred."""
    scale = min(out_h / height, out_w / width)
    new_h = min(out_h, max(1, round(height * scale)))
    new_w = min(out_w, max(1, round(width * scale)))
    return new_h, new_w, (out_h - new_h) // 2, (out_w - new_w) // 2


def _geometry(image: torch.Tensor, layout: ImageLayout) -> tuple[int, int, int, int, int, int]:
    """Validate one image; return (C, H, W, stride_c, stride_h, stride_w) of its row-major storage."""
    if image.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 images, got {image.dtype}")
    shape = tuple(image.shape)
    if image.dim() == 2:
        c, h, w = 1, shape[0], shape[1]
        strides = (0, w, 1)
    elif image.dim() == 3 and layout == "chw" and shape[0] in (1, 3):
        c, h, w = shape
        strides = (h * w if c == 3 else 0, w, 1)
    elif image.dim() == 3 and layout == "hwc" and shape[2] in (1, 3):
        h, w, c = shape
        strides = (1 if c == 3 else 0, w * c, c)
    elif layout not in ("chw", "hwc"):
        raise ValueError(f"unknown image layout {layout!r}; use 'chw' or 'hwc'")
    else:
        expected = "(C, H, W)" if layout == "chw" else "(H, W, C)"
        raise ValueError(f"preprocess expects (H, W) or {expected} with C in 1 or 3, got shape {shape}")
    if h < 1 or w < 1:
        raise ValueError(f"preprocess got an empty image of shape {shape}")
    return c, h, w, *strides


def _as_chw(image: torch.Tensor, layout: ImageLayout = "chw") -> torch.Tensor:
    _geometry(image, layout)
    if image.dim() == 2:
        return image.unsqueeze(0)
    return image if layout == "chw" else image.permute(2, 0, 1)


def _resize(chw: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    x = chw.unsqueeze(0).float()
    if x.shape[-2:] == (out_h, out_w):
        return x[0]
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)[0]


def _check_args(images: Sequence[torch.Tensor], size: tuple[int, int], policy: str, pad: str) -> None:
    if not images:
        raise ValueError("preprocess needs at least one image")
    if len(size) != 2 or size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be (height, width) with both >= 1, got {size}")
    if policy not in ("squash", "letterbox"):
        raise ValueError(f"unknown resize policy {policy!r}; use 'squash' or 'letterbox'")
    if pad not in _PAD_CODES:
        raise ValueError(f"unknown pad mode {pad!r}; use 'zero', 'white' or 'edge'")
    device = images[0].device
    for image in images:
        if image.device != device:
            raise ValueError(f"all images must be on one device, got {device} and {image.device}")


def preprocess_reference(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    *,
    policy: ResizePolicy = "squash",
    pad: PadMode = "zero",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    layout: ImageLayout = "chw",
) -> torch.Tensor:
    """Plain-torch preprocessing, one image at a time. See the module docstring for the semantics."""
    _check_args(images, size, policy, pad)
    out_h, out_w = size
    device = images[0].device
    batch = torch.empty((len(images), 3, out_h, out_w), dtype=torch.float32, device=device)
    for i, image in enumerate(images):
        chw = _as_chw(image, layout)
        if policy == "squash":
            resized = _resize(chw, out_h, out_w)
        else:
            new_h, new_w, top, left = letterbox_geometry(chw.shape[1], chw.shape[2], out_h, out_w)
            inner = _resize(chw, new_h, new_w)
            pads = (left, out_w - new_w - left, top, out_h - new_h - top)
            if pad == "edge":
                resized = F.pad(inner.unsqueeze(0), pads, mode="replicate")[0]
            else:
                resized = F.pad(inner, pads, mode="constant", value=255.0 if pad == "white" else 0.0)
        batch[i] = resized.expand(3, out_h, out_w)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    batch = (batch / 255.0 - mean_t) / std_t
    batch = batch.to(dtype)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def _taps(in_size: int, out_size: int) -> int:
    """Upper bound on the filter taps per output pixel of an antialiased bilinear resize.

    The support is max(in/out, 1) on each side, so at most ceil(2 * support) taps; one more absorbs
    float32 rounding in the kernel, which masks taps outside its exact window anyway.
    """
    support = max(in_size / out_size, 1.0)
    return math.floor(2.0 * support) + 2


def pack_groups(images: Sequence[torch.Tensor], limit: int = PACK_BYTES) -> list[range]:
    """Split image positions into consecutive groups of at most `limit` bytes each (an image larger than `limit`
    alone in its group): one kernel launch per group."""
    groups: list[range] = []
    start, total = 0, 0
    for i, image in enumerate(images):
        nbytes = image.numel() * image.element_size()
        if i > start and total + nbytes > limit:
            groups.append(range(start, i))
            start, total = i, 0
        total += nbytes
    if len(images) > start:
        groups.append(range(start, len(images)))
    return groups


def _pack(
    images: Sequence[torch.Tensor], size: tuple[int, int], policy: ResizePolicy, layout: ImageLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ragged images into one flat uint8 buffer and an int64 (N, 13) table on their device.

    The buffer is a copy of the images, except for a single contiguous image: then it is a view of its storage.
    """
    out_h, out_w = size
    rows: list[list[int]] = []
    offset = 0
    for image in images:
        c, h, w, s_c, s_h, s_w = _geometry(image, layout)
        if policy == "squash":
            new_h, new_w, top, left = out_h, out_w, 0, 0
        else:
            new_h, new_w, top, left = letterbox_geometry(h, w, out_h, out_w)
        rows.append([offset, c, h, w, s_c, s_h, s_w, new_h, new_w, top, left, _taps(h, new_h), _taps(w, new_w)])
        offset += image.numel()
    flat = images[0].reshape(-1) if len(images) == 1 else torch.cat([image.reshape(-1) for image in images])
    table = torch.tensor(rows, dtype=torch.int64).to(images[0].device, non_blocking=True)
    return flat, table


def _preprocess_triton(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    *,
    policy: ResizePolicy = "squash",
    pad: PadMode = "zero",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    layout: ImageLayout = "chw",
    block_h: int | None = None,
    block_w: int | None = None,
    pack_bytes: int = PACK_BYTES,
) -> torch.Tensor:
    """Run the fused Triton kernel, one launch per `pack_groups` group (CUDA tensors, or CPU under
    TRITON_INTERPRET=1)."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton preprocess kernel needs the triton package")
    _check_args(images, size, policy, pad)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton preprocess kernel writes float32, float16 or bfloat16, not {dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need three values each (one per output channel)")
    out_h, out_w = size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((len(images), 3, out_h, out_w), dtype=dtype, device=images[0].device, memory_format=memory_format)
    bh = block_h or min(16, next_power_of_2(out_h))
    bw = block_w or min(32, next_power_of_2(out_w))
    for group in pack_groups(images, pack_bytes):
        flat, table = _pack(images[group.start : group.stop], size, policy, layout)
        part = out[group.start : group.stop]
        grid = (len(group), triton.cdiv(out_h, bh), triton.cdiv(out_w, bw))
        _preprocess_kernel[grid](
            flat,
            table,
            part,
            out_h,
            out_w,
            *part.stride(),
            *(float(m) for m in mean),
            *(float(s) for s in std),
            PAD_MODE=_PAD_CODES[pad] if policy == "letterbox" else 0,
            TABLE_COLS=_TABLE_COLS,
            BLOCK_H=bh,
            BLOCK_W=bw,
        )
        del flat, table  # the next group's pack must not hold this one's copy too
    return out


def preprocess_batch(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    *,
    policy: ResizePolicy = "squash",
    pad: PadMode = "zero",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    layout: ImageLayout = "chw",
    backend: Backend = "auto",
) -> torch.Tensor:
    """Preprocess a batch of ragged uint8 images into one (N, 3, H, W) tensor on their device.

    Images are (H, W) gray, or (C, H, W) / (H, W, C) per `layout`, with C in {1, 3}; the module
    docstring gives the exact semantics. With `backend="auto"` the fused Triton kernel (one launch for
    the batch) runs for CUDA images when triton is installed and `dtype` is float32, float16 or
    bfloat16; otherwise the plain-torch reference runs. See `kernels._triton` for "triton" and "torch".
    """
    _check_args(images, size, policy, pad)
    if backend == "auto" and dtype not in KERNEL_DTYPES:
        logger.debug("preprocess_batch: no kernel for %s output, using the reference", dtype)
        backend = "torch"
    run = (
        _preprocess_triton
        if use_triton(backend, images[0].device, _preprocess_kernel if TRITON_AVAILABLE else None)
        else preprocess_reference
    )
    return run(
        images,
        size,
        policy=policy,
        pad=pad,
        mean=mean,
        std=std,
        dtype=dtype,
        channels_last=channels_last,
        layout=layout,
    )


def warmup(
    device: torch.device,
    size: tuple[int, int],
    *,
    policy: ResizePolicy = "squash",
    pad: PadMode = "zero",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    backend: Backend = "auto",
) -> int:
    """Launch the Triton kernel as `preprocess_batch` will for these settings, so that it is compiled (or loaded
    from Triton's cache) before real work; returns the launches made, 0 when these settings run the reference
    (nothing to compile).

    Triton compiles one variant per constant (`PAD_MODE`, the block sizes), output dtype and argument
    specialisation, among them whether each pointer is 16-byte aligned. The settings fix all but one: a batch of
    more than `PACK_BYTES` starts its later launches at an offset into the output, which need not be aligned. So
    the warm-up runs two small images in one packed launch, then the same two in a launch each (the second at an
    offset), and covers both variants.
    """
    sample = [
        torch.zeros((1, 48, 40), dtype=torch.uint8, device=device),
        torch.full((3, 30, 52), 128, dtype=torch.uint8, device=device),
    ]
    _check_args(sample, size, policy, pad)
    if (backend == "auto" and dtype not in KERNEL_DTYPES) or not use_triton(
        backend, device, _preprocess_kernel if TRITON_AVAILABLE else None
    ):
        return 0
    launch = functools.partial(
        _preprocess_triton, sample, size, policy=policy, pad=pad, mean=mean, std=std, dtype=dtype,
        channels_last=channels_last,
    )  # fmt: skip
    launch()  # one packed launch
    launch(pack_bytes=1)  # a launch per image: the second writes at an offset into the output
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1 + len(sample)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _preprocess_kernel(  # type: ignore[no-untyped-def]
        src_ptr,
        table_ptr,
        out_ptr,
        out_h,
        out_w,
        stride_on,
        stride_oc,
        stride_oh,
        stride_ow,
        mean0,
        mean1,
        mean2,
        std0,
        std1,
        std2,
        PAD_MODE: tl.constexpr,
        TABLE_COLS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        img = tl.program_id(0)
        row = table_ptr + img * TABLE_COLS
        offset = tl.load(row + 0)
        channels = tl.load(row + 1).to(tl.int32)
        in_h = tl.load(row + 2).to(tl.int32)
        in_w = tl.load(row + 3).to(tl.int32)
        stride_c = tl.load(row + 4).to(tl.int32)
        stride_h = tl.load(row + 5).to(tl.int32)
        stride_w = tl.load(row + 6).to(tl.int32)
        new_h = tl.load(row + 7).to(tl.int32)
        new_w = tl.load(row + 8).to(tl.int32)
        top = tl.load(row + 9).to(tl.int32)
        left = tl.load(row + 10).to(tl.int32)
        taps_y = tl.load(row + 11).to(tl.int32)
        taps_x = tl.load(row + 12).to(tl.int32)
        # A full tile rather than a scalar: the interpreter cannot AND a scalar into a load mask.
        is_rgb = (tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.int32) + channels) == 3

        oy = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ox = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        valid = (oy < out_h)[:, None] & (ox < out_w)[None, :]
        # Position in the resized (letterboxed) image; pad pixels sample the nearest resized pixel,
        # which is exactly what edge padding needs, and is masked away for zero/white padding.
        iy = oy - top
        ix = ox - left
        inside = ((iy >= 0) & (iy < new_h))[:, None] & ((ix >= 0) & (ix < new_w))[None, :]
        iy = tl.minimum(tl.maximum(iy, 0), new_h - 1)
        ix = tl.minimum(tl.maximum(ix, 0), new_w - 1)
        active = valid if PAD_MODE == 2 else valid & inside

        # Antialiased bilinear as in PyTorch: triangle filter, support max(scale, 1) input pixels on
        # each side of the centre, argument scaled by 1 / max(scale, 1), weights normalised to sum 1.
        scale_y = in_h.to(tl.float32) / new_h.to(tl.float32)
        scale_x = in_w.to(tl.float32) / new_w.to(tl.float32)
        support_y = tl.maximum(scale_y, 1.0)
        support_x = tl.maximum(scale_x, 1.0)
        inv_y = 1.0 / support_y
        inv_x = 1.0 / support_x
        center_y = scale_y * (iy.to(tl.float32) + 0.5)
        center_x = scale_x * (ix.to(tl.float32) + 0.5)
        y0 = tl.maximum((center_y - support_y + 0.5).to(tl.int32), 0)
        y1 = tl.minimum((center_y + support_y + 0.5).to(tl.int32), in_h)
        x0 = tl.maximum((center_x - support_x + 0.5).to(tl.int32), 0)
        x1 = tl.minimum((center_x + support_x + 0.5).to(tl.int32), in_w)

        base = src_ptr + offset
        acc0 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        sum_x = tl.zeros((BLOCK_W,), dtype=tl.float32)
        sum_y = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for tx in range(0, taps_x):
            xj = x0 + tx
            in_x = xj < x1
            wx = tl.maximum(1.0 - tl.abs((xj.to(tl.float32) - center_x + 0.5) * inv_x), 0.0)
            wx = tl.where(in_x, wx, 0.0)
            h0 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
            h1 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
            h2 = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
            wy_total = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for ty in range(0, taps_y):
                yj = y0 + ty
                in_y = yj < y1
                wy = tl.maximum(1.0 - tl.abs((yj.to(tl.float32) - center_y + 0.5) * inv_y), 0.0)
                wy = tl.where(in_y, wy, 0.0)
                mask = active & in_y[:, None] & in_x[None, :]
                ptr = base + yj[:, None] * stride_h + xj[None, :] * stride_w
                p0 = tl.load(ptr, mask=mask, other=0).to(tl.float32)
                p1 = tl.load(ptr + stride_c, mask=mask & is_rgb, other=0).to(tl.float32)
                p2 = tl.load(ptr + 2 * stride_c, mask=mask & is_rgb, other=0).to(tl.float32)
                h0 += wy[:, None] * p0
                h1 += wy[:, None] * p1
                h2 += wy[:, None] * p2
                wy_total += wy
            acc0 += wx[None, :] * h0
            acc1 += wx[None, :] * h1
            acc2 += wx[None, :] * h2
            sum_x += wx
            sum_y = wy_total
        norm = sum_y[:, None] * sum_x[None, :]
        v0 = acc0 / norm
        v1 = tl.where(is_rgb, acc1 / norm, v0)
        v2 = tl.where(is_rgb, acc2 / norm, v0)
        if PAD_MODE == 0:
            v0 = tl.where(inside, v0, 0.0)
            v1 = tl.where(inside, v1, 0.0)
            v2 = tl.where(inside, v2, 0.0)
        elif PAD_MODE == 1:
            v0 = tl.where(inside, v0, 255.0)
            v1 = tl.where(inside, v1, 255.0)
            v2 = tl.where(inside, v2, 255.0)

        out = out_ptr + img.to(tl.int64) * stride_on + oy[:, None] * stride_oh + ox[None, :] * stride_ow
        tl.store(out, ((v0 / 255.0 - mean0) / std0).to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out + stride_oc, ((v1 / 255.0 - mean1) / std1).to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out + 2 * stride_oc, ((v2 / 255.0 - mean2) / std2).to(out_ptr.dtype.element_ty), mask=valid)
