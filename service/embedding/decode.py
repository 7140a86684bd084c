"""Encoded bytes -> uint8 pixel tensors, one backend at a time, one bad image failing alone.

Every image is first probed with Pillow, which reads only the header: format, mode, size. The
probe rejects empty, unknown, zero-size and too-large images before any pixel is decoded, and
routes what a fast backend cannot handle (CMYK and 16-bit images, formats other than JPEG/PNG,
JPEGs without an end marker) to Pillow, so every backend accepts the same inputs.

Backends:
- `dali`: NVIDIA DALI image decoder fed from memory; `mixed` (nvJPEG) on a GPU, CPU otherwise.
- `torchvision`: `torchvision.io` decoders; batched nvJPEG on a GPU, libjpeg-turbo/libpng on CPU.
- `pillow`: Pillow, in a thread pool; JPEGs are decoded at reduced scale (DCT scaling) when that
  still leaves at least the pixels the resize needs.

Output: one tensor per image, uint8, (1, H, W) for grayscale or (3, H, W) for colour, on the
backend's device; or an `ImageError` in its place.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kernels.preprocess import letterbox_geometry
from service.config import DecodeConfig
from service.errors import ConfigError, ImageError, ImageTooLargeError, InvalidImageError, UnsupportedImageError

logger = logging.getLogger(__name__)

DecodeOutcome = torch.Tensor | ImageError

# Pillow's own bomb check would warn or raise at its fixed limit; ours is configurable and per image.
Image.MAX_IMAGE_PIXELS = None

_FAST_FORMATS = frozenset({"JPEG", "PNG"})
_FAST_MODES = frozenset({"L", "RGB", "RGBA", "LA", "P"})
_JPEG_EOI = b"\xff\xd9"


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the header says about an image, read without decoding pixels."""

    format: str
    mode: str
    width: int
    height: int
    has_end_marker: bool = True

    @property
    def fast_path_ok(self) -> bool:
        """True when DALI and torchvision decode this image exactly as Pillow would."""
        return self.format in _FAST_FORMATS and self.mode in _FAST_MODES and self.has_end_marker


def probe(data: bytes, max_pixels: int) -> ImageHeader:
    """Read the header of an encoded image, or raise an `ImageError` that says what is wrong."""
    if not data:
        raise InvalidImageError("empty image: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            header = ImageHeader(format=str(img.format), mode=img.mode, width=img.width, height=img.height)
    except UnidentifiedImageError as e:
        raise InvalidImageError(f"not a recognised image format ({len(data)} bytes)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"corrupt image header: {e}") from e
    if header.width <= 0 or header.height <= 0:
        raise InvalidImageError(f"zero-size image: {header.width}x{header.height}")
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"image is {header.width}x{header.height} = {pixels} pixels, more than decode.max_pixels={max_pixels}"
        )
    if header.format == "JPEG" and _JPEG_EOI not in data[-4096:]:
        header = ImageHeader(header.format, header.mode, header.width, header.height, has_end_marker=False)
    if header.format == "PNG" and len(data) > 24 and data[24] == 16:
        # Pillow reports 16-bit RGB PNGs as mode RGB; other decoders return uint16, so keep them on Pillow.
        header = ImageHeader(header.format, "RGB;16", header.width, header.height)
    return header


def decode_size_hint(header: ImageHeader, size: tuple[int, int], policy: str) -> tuple[int, int]:
    """The (height, width) the image will be resized to: what a reduced-scale decode must not go below."""
    out_h, out_w = size
    if policy == "letterbox":
        new_h, new_w, _, _ = letterbox_geometry(header.height, header.width, out_h, out_w)
        return new_h, new_w
    return out_h, out_w


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A loaded Pillow image -> uint8 (1|3, H, W), converting every mode to grayscale or RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or wide.max(initial=0) > 255 else 255
        arr = np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
        return torch.from_numpy(arr).unsqueeze(0)
    if mode == "F":
        raise UnsupportedImageError("floating-point images are not supported; convert to 8 or 16-bit")
    if mode in ("1", "LA", "L"):
        img = img.convert("L") if mode != "L" else img
        return torch.from_numpy(np.array(img, dtype=np.uint8)).unsqueeze(0)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        # RGBA/PA drop alpha; CMYK (Adobe inverted or not) and YCbCr go through Pillow's converters.
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_with_pillow(data: bytes, header: ImageHeader, *, reduce_to: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode one image with Pillow; `reduce_to` (h, w) lets a JPEG decode at a smaller DCT scale."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if reduce_to is not None and header.format == "JPEG":
                img.draft(None, (reduce_to[1], reduce_to[0]))
            img.load()
            return _pil_to_tensor(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"corrupt or truncated {header.format} data: {e}") from e


class Decoder(Protocol):
    """Decodes a batch; one result per input, a tensor or the image's own error."""

    name: str
    device: torch.device

    def decode(self, datas: Sequence[bytes], size: tuple[int, int], policy: str) -> list[DecodeOutcome]: ...


class _ProbingDecoder(abc.ABC):
    """Shared shape of every backend: probe all, decode the fast-path images in a batch, Pillow the rest."""

    name = "base"
    max_batch: int | None = None
    """Most images one `_decode_batch` call takes (None = any number)."""

    def __init__(self, cfg: DecodeConfig, device: torch.device, executor: ThreadPoolExecutor) -> None:
        self.cfg = cfg
        self.device = device
        self.executor = executor

    def decode(self, datas: Sequence[bytes], size: tuple[int, int], policy: str) -> list[DecodeOutcome]:
        results: list[DecodeOutcome | None] = [None] * len(datas)
        headers: list[ImageHeader | None] = [None] * len(datas)
        for i, data in enumerate(datas):
            try:
                headers[i] = probe(data, self.cfg.max_pixels)
            except ImageError as e:
                results[i] = e
        fast = [i for i, h in enumerate(headers) if h is not None and self._takes(h)]
        if fast:
            for i, out in zip(fast, self._decode_fast([datas[i] for i in fast]), strict=True):
                results[i] = out
        slow = [i for i, r in enumerate(results) if r is None]

        def pillow_one(i: int) -> DecodeOutcome:
            header = headers[i]
            assert header is not None  # every slow index passed the probe
            return self._pillow(datas[i], header, size, policy)

        for i, out in zip(slow, self.executor.map(pillow_one, slow), strict=True):
            results[i] = out
        if any(r is None for r in results):
            raise RuntimeError("decode left an image without a result")
        return [r for r in results if r is not None]

    def _takes(self, header: ImageHeader) -> bool:
        return header.fast_path_ok

    @abc.abstractmethod
    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        """Decode images that passed `_takes`, all at once; raises if any of them is bad."""

    def _decode_fast(self, datas: list[bytes]) -> list[DecodeOutcome]:
        step = self.max_batch or len(datas) or 1
        outcomes: list[DecodeOutcome] = []
        for start in range(0, len(datas), step):
            outcomes.extend(self._isolate(datas[start : start + step], self._decode_batch))
        return outcomes

    def _pillow(self, data: bytes, header: ImageHeader, size: tuple[int, int], policy: str) -> DecodeOutcome:
        try:
            return decode_with_pillow(data, header).to(self.device)
        except ImageError as e:
            return e

    def _isolate(
        self, datas: list[bytes], decode_batch: Callable[[list[bytes]], list[torch.Tensor]]
    ) -> list[DecodeOutcome]:
        """Decode as one batch; if the batch fails, decode one by one so only the bad images fail."""
        try:
            return list(decode_batch(datas))
        except (RuntimeError, ValueError, OSError) as batch_error:
            logger.debug("%s batch decode failed (%s); isolating images", self.name, batch_error)
        outcomes: list[DecodeOutcome] = []
        for data in datas:
            try:
                outcomes.append(decode_batch([data])[0])
            except (RuntimeError, ValueError, OSError) as e:
                outcomes.append(InvalidImageError(f"corrupt image data: {_first_line(e)}"))
        return outcomes


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


class PillowDecoder(_ProbingDecoder):
    """Pillow for every image, in parallel threads (Pillow releases the GIL while decoding)."""

    name = "pillow"

    def _takes(self, header: ImageHeader) -> bool:
        return False  # every image takes the `_pillow` path, which can decode at reduced scale

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        return [decode_with_pillow(d, probe(d, self.cfg.max_pixels)).to(self.device) for d in datas]

    def _pillow(self, data: bytes, header: ImageHeader, size: tuple[int, int], policy: str) -> DecodeOutcome:
        reduce_to = decode_size_hint(header, size, policy) if self.cfg.reduced_decode else None
        try:
            return decode_with_pillow(data, header, reduce_to=reduce_to).to(self.device)
        except ImageError as e:
            return e


class TorchvisionDecoder(_ProbingDecoder):
    """torchvision.io: batched nvJPEG on CUDA, libjpeg-turbo / libpng on CPU."""

    name = "torchvision"

    def __init__(self, cfg: DecodeConfig, device: torch.device, executor: ThreadPoolExecutor) -> None:
        super().__init__(cfg, device, executor)
        import torchvision.io as tvio

        # torchvision 0.29 deprecates its decoders (for TorchCodec) and warns on every call; they work and are tested.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

        self._io = tvio

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        tvio = self._io
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if self.device.type == "cuda" and all(d[:2] == b"\xff\xd8" for d in datas):
            decoded = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.UNCHANGED, device=self.device)
            return [_drop_alpha(t) for t in decoded]
        return [_drop_alpha(tvio.decode_image(e, mode=tvio.ImageReadMode.UNCHANGED)).to(self.device) for e in encoded]


def _drop_alpha(t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] == 2:
        return t[:1]
    if t.shape[0] == 4:
        return t[:3]
    return t


class DaliDecoder(_ProbingDecoder):
    """NVIDIA DALI's image decoder: `mixed` (nvJPEG, hardware decoder where present) on CUDA, CPU otherwise."""

    name = "dali"

    def __init__(self, cfg: DecodeConfig, device: torch.device, executor: ThreadPoolExecutor, max_batch: int) -> None:
        super().__init__(cfg, device, executor)
        from nvidia.dali import fn, pipeline_def, types

        self.max_batch = max_batch
        on_gpu = device.type == "cuda"
        device_id = (device.index or 0) if on_gpu else None
        threads = max(1, cfg.workers or os.cpu_count() or 1)

        @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def pipeline():  # type: ignore[no-untyped-def]
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
            return fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)

        self._pipe = pipeline()
        self._pipe.build()

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        self._pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        (out,) = self._pipe.run()
        tensors: list[torch.Tensor] = []
        for i in range(len(datas)):
            sample = out[i]
            if self.device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray

                hwc = torch.empty(tuple(sample.shape()), dtype=torch.uint8, device=self.device)
                feed_ndarray(sample, hwc, cuda_stream=torch.cuda.current_stream(self.device))
            else:
                hwc = torch.from_numpy(np.array(sample))
            tensors.append(hwc.permute(2, 0, 1).contiguous())
        return tensors


def create_decoder(cfg: DecodeConfig, device: torch.device, executor: ThreadPoolExecutor, *, max_batch: int) -> Decoder:
    """The configured backend, or with `auto` the first that works here: DALI, torchvision (GPU only), Pillow."""
    builders: dict[str, Callable[[], Decoder]] = {
        "dali": lambda: _checked(DaliDecoder(cfg, device, executor, max_batch)),
        "torchvision": lambda: _checked(TorchvisionDecoder(cfg, device, executor)),
        "pillow": lambda: PillowDecoder(cfg, device, executor),
    }
    if cfg.backend != "auto":
        try:
            return builders[cfg.backend]()
        except (ImportError, RuntimeError, OSError) as e:
            raise ConfigError(
                f"decode backend {cfg.backend!r} does not work here ({_first_line(e)}); use backend='auto' or 'pillow'"
            ) from e
    # On the CPU, Pillow's reduced-scale JPEG decode beats full-size decoders; on a GPU, decode there.
    order = ["dali", "torchvision", "pillow"] if device.type == "cuda" else ["pillow"]
    for name in order:
        try:
            decoder = builders[name]()
        except (ImportError, RuntimeError, OSError) as e:
            logger.info("decode backend %s unavailable: %s", name, _first_line(e))
            continue
        logger.info("decode backend: %s on %s", decoder.name, device)
        return decoder
    raise RuntimeError("no decode backend works")  # unreachable: pillow always builds


def _checked(decoder: _ProbingDecoder) -> Decoder:
    """Decode a tiny JPEG once so a backend that imports but cannot run is found at start, not per request."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, format="JPEG")
    (out,) = decoder._decode_fast([buf.getvalue()])
    if isinstance(out, ImageError):
        raise RuntimeError(f"{decoder.name} failed to decode a test JPEG: {out.message}")
    return decoder
