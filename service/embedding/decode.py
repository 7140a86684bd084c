"""Encoded bytes -> uint8 pixel tensors, one backend at a time, one bad image failing alone.

Every image is first probed with Pillow, which reads only the header: format, mode, size. Only the formats of
`decode.formats` are tried (see `service.embedding.formats`); anything else is `unsupported_image`. The probe
rejects empty, unknown, zero-size and too-large images, and JPEGs too short to hold the image their header
describes, before any pixel is decoded. It routes what a fast backend cannot handle (CMYK and 16-bit images,
formats other than JPEG/PNG, JPEGs without an end marker) to the strict CPU path, so every backend accepts
the same inputs.

The strict CPU path decodes JPEGs with libjpeg-turbo through `simplejpeg` in strict mode: data that ends before
the image is complete (libjpeg's "premature end of data" warnings) is an error, not an image padded with grey.
Other formats go through Pillow, which refuses truncated files (`LOAD_TRUNCATED_IMAGES` stays off).

Backends:
- `dali`: NVIDIA DALI image decoder fed from memory; `mixed` (nvJPEG) on a GPU, CPU otherwise.
- `torchvision`: `torchvision.io` decoders; batched nvJPEG on a GPU, libjpeg-turbo/libpng on CPU.
- `pillow`: the strict CPU path for every image, in a thread pool; JPEGs are decoded at reduced scale
  (DCT scaling) when that still leaves at least the pixels the resize needs.
On the CPU, the libjpeg-turbo behind torchvision and DALI accepts truncated JPEGs, so their JPEGs take the
strict CPU path too (they keep PNG). On a GPU, JPEGs go to nvJPEG once the probe's checks pass.

Whatever one image raises is that image's error: an expected decoder error (`OSError`, `ValueError`, ...) keeps
its first line as the message; any other exception type gets a generic message naming the format, and its type
goes to the log. Only a fatal device error (`service.embedding.faults.is_fatal`) propagates.

Output: one tensor per image, uint8, (1, H, W) for grayscale or (3, H, W) for colour, on the
backend's device; or an `ImageError` in its place.
"""

from __future__ import annotations

import abc
import io
import logging
import math
import os
import queue
import struct
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

from kernels.preprocess import letterbox_geometry
from service.config import DEFAULT_FORMATS, DecodeConfig
from service.embedding.faults import is_fatal
from service.embedding.formats import canonical_format, jpeg_frame, register_formats, sniff_format
from service.errors import ConfigError, ImageError, ImageTooLargeError, InvalidImageError, UnsupportedImageError

logger = logging.getLogger(__name__)

DecodeOutcome = torch.Tensor | ImageError

# Pillow's own bomb check would warn or raise at its fixed limit; ours is configurable and per image.
Image.MAX_IMAGE_PIXELS = None

_FAST_FORMATS = frozenset({"JPEG", "PNG"})
_FAST_MODES = frozenset({"L", "RGB", "RGBA", "LA", "P"})
_JPEG_EOI = b"\xff\xd9"
# What decoders raise for bad data on purpose; their messages are written for people and are kept (first line).
_EXPECTED_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error)


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the header says about an image, read without decoding pixels."""

    format: str
    mode: str
    width: int
    height: int
    has_end_marker: bool = True
    structure_ok: bool = True
    """False when a quick walk of the container could not vouch for it (a JPEG's markers); strict path only."""

    @property
    def fast_path_ok(self) -> bool:
        """True when DALI and torchvision decode this image exactly as the strict CPU path would."""
        return self.format in _FAST_FORMATS and self.mode in _FAST_MODES and self.has_end_marker and self.structure_ok


class _FailureLog:
    """Logs why images failed: an unexpected exception type as a warning at most once a minute, the rest at debug.

    Bad images are the caller's problem, not the server's, so they must not flood the log; a new kind of decoder
    crash is worth one warning (with its type) so that someone looks.
    """

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, error: BaseException, fmt: str, where: str) -> None:
        kind = type(error).__name__
        detail = _first_line(error)
        if isinstance(error, _EXPECTED_ERRORS):
            logger.debug("%s %s failed: %s: %s", fmt, where, kind, detail)
            return
        now = time.monotonic()
        with self._lock:
            warn = now - self._last.get(kind, -math.inf) >= self.interval_s
            if warn:
                self._last[kind] = now
        if warn:
            logger.warning(
                "%s %s raised %s (%s); that image fails as invalid_image (more %s logged at debug for %.0f s)",
                fmt,
                where,
                kind,
                detail,
                kind,
                self.interval_s,
            )
        else:
            logger.debug("%s %s raised %s: %s", fmt, where, kind, detail)


_failures = _FailureLog()


def image_error(
    error: Exception, fmt: str, *, stage: Literal["header", "data"], decoder: str | None = None
) -> ImageError:
    """The `ImageError` of one image whose decoder raised `error`, with a message safe to send to a client.

    Fatal device errors are not image errors: callers check `is_fatal` first and re-raise those.
    """
    if isinstance(error, ImageError):
        return error
    where = f"{stage} decode" + (f" ({decoder})" if decoder else "")
    _failures.record(error, fmt, where)
    what = "header" if stage == "header" else "data"
    if decoder is not None:
        # Native decoders' messages carry source paths and internal state: never the client's business.
        return InvalidImageError(f"corrupt or truncated {fmt} {what}: the {decoder} decoder refused it")
    if isinstance(error, _EXPECTED_ERRORS):
        return InvalidImageError(f"corrupt or truncated {fmt} {what}: {_first_line(error)}")
    return InvalidImageError(f"corrupt or unsupported {fmt} {what}: the decoder could not read it")


def _unidentified(data: bytes, formats: tuple[str, ...]) -> ImageError:
    claimed = sniff_format(data)
    if claimed is not None and claimed not in formats:
        return UnsupportedImageError(
            f"{claimed} images are not accepted (decode.formats: {', '.join(formats)}); convert it to one of those"
        )
    if claimed is not None:
        return InvalidImageError(f"corrupt {claimed} header: no {claimed} image could be read from it")
    return InvalidImageError(f"not a {', '.join(formats)} image ({len(data)} bytes)")


def probe(data: bytes, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS) -> ImageHeader:
    """Read the header of an encoded image, or raise an `ImageError` that says what is wrong.

    Only the Pillow plugins of `formats` are tried (`register_formats` should have imported them).
    """
    if not data:
        raise InvalidImageError("empty image: 0 bytes")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            header = ImageHeader(format=canonical_format(img.format), mode=img.mode, width=img.width, height=img.height)
    except UnidentifiedImageError as e:
        raise _unidentified(data, formats) from e
    except Exception as e:
        if is_fatal(e):
            raise
        raise image_error(e, sniff_format(data) or "image", stage="header") from e
    if header.format not in formats:
        raise UnsupportedImageError(f"{header.format} images are not accepted (decode.formats: {', '.join(formats)})")
    if header.width <= 0 or header.height <= 0:
        raise InvalidImageError(f"zero-size image: {header.width}x{header.height}")
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"image is {header.width}x{header.height} = {pixels} pixels, more than decode.max_pixels={max_pixels}"
        )
    if header.format == "JPEG":
        header = _check_jpeg(data, header)
    if header.format == "PNG" and len(data) > 24 and data[24] == 16:
        # Pillow reports 16-bit RGB PNGs as mode RGB; other decoders return uint16, so keep them on Pillow.
        header = replace(header, mode="RGB;16")
    return header


def _check_jpeg(data: bytes, header: ImageHeader) -> ImageHeader:
    """Refuse a JPEG too short for its own frame header; mark what the fast decoders must not be trusted with."""
    frame = jpeg_frame(data)
    if frame is not None:
        need, have = frame.min_entropy_bytes(), len(data) - frame.scan_start
        if have < need:
            raise InvalidImageError(
                f"truncated JPEG: a {frame.width}x{frame.height} image needs at least {need} bytes of scan data, "
                f"this one has {have}"
            )
    return replace(header, has_end_marker=_JPEG_EOI in data[-4096:], structure_ok=frame is not None)


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


def decode_cpu(data: bytes, header: ImageHeader, *, reduce_to: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode one probed image on the CPU, strictly; `reduce_to` (h, w) lets a JPEG decode at a smaller DCT scale.

    Raises whatever the decoder raises for bad data (callers turn that into the image's error with `image_error`).
    """
    if header.format == "JPEG":
        return _decode_jpeg(data, header, reduce_to)
    with Image.open(io.BytesIO(data), formats=(header.format,)) as img:
        img.load()
        return _pil_to_tensor(img)


def _decode_jpeg(data: bytes, header: ImageHeader, reduce_to: tuple[int, int] | None) -> torch.Tensor:
    scale = {} if reduce_to is None else {"min_height": reduce_to[0], "min_width": reduce_to[1]}
    if header.mode in ("L", "RGB"):
        colorspace = "GRAY" if header.mode == "L" else "RGB"
        hwc = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, **scale)
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    # CMYK / YCCK: libjpeg-turbo checks the data (at 1/8 scale: every coefficient is still read), Pillow then
    # decodes it and applies the Adobe colour conventions that a raw CMYK decode would not.
    simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True, min_factor=8)
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
        if reduce_to is not None:
            img.draft(None, (reduce_to[1], reduce_to[0]))
        img.load()
        return _pil_to_tensor(img)


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
        self.formats = register_formats(cfg.formats)
        """The accepted Pillow formats; their plugins, and no others, are loaded for decode."""

    def decode(self, datas: Sequence[bytes], size: tuple[int, int], policy: str) -> list[DecodeOutcome]:
        results: list[DecodeOutcome | None] = [None] * len(datas)
        headers: list[ImageHeader | None] = [None] * len(datas)
        for i, data in enumerate(datas):
            try:
                headers[i] = probe(data, self.cfg.max_pixels, self.formats)
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
        # On the CPU these libraries' libjpeg-turbo accepts truncated JPEGs (grey fill); the strict path does not.
        return header.fast_path_ok and (header.format != "JPEG" or self.device.type == "cuda")

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
        return self._strict(data, header, None)

    def _strict(self, data: bytes, header: ImageHeader, reduce_to: tuple[int, int] | None) -> DecodeOutcome:
        """The strict CPU path for one image; whatever it raises (but a fatal device error) is the image's error."""
        try:
            return decode_cpu(data, header, reduce_to=reduce_to).to(self.device)
        except Exception as e:
            if is_fatal(e):
                raise
            return image_error(e, header.format, stage="data")

    def _isolate(
        self, datas: list[bytes], decode_batch: Callable[[list[bytes]], list[torch.Tensor]]
    ) -> list[DecodeOutcome]:
        """Decode as one batch; if the batch fails, decode one by one so only the bad images fail."""
        try:
            outcomes: list[DecodeOutcome] = list(decode_batch(datas))
        except Exception as batch_error:
            if is_fatal(batch_error):
                raise
            logger.debug("%s batch decode failed (%s); isolating images", self.name, type(batch_error).__name__)
        else:
            if len(outcomes) == len(datas):
                return outcomes
            logger.warning("%s returned %d images for %d; isolating", self.name, len(outcomes), len(datas))
        outcomes = []
        for data in datas:
            try:
                outcomes.append(decode_batch([data])[0])
            except Exception as e:
                if is_fatal(e):
                    raise
                outcomes.append(image_error(e, sniff_format(data) or "image", stage="data", decoder=self.name))
        return outcomes


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


class PillowDecoder(_ProbingDecoder):
    """The strict CPU path for every image, in parallel threads (libjpeg-turbo and Pillow release the GIL)."""

    name = "pillow"

    def _takes(self, header: ImageHeader) -> bool:
        return False  # every image takes the `_pillow` path, which can decode at reduced scale

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        return [decode_cpu(d, probe(d, self.cfg.max_pixels, self.formats)).to(self.device) for d in datas]

    def _pillow(self, data: bytes, header: ImageHeader, size: tuple[int, int], policy: str) -> DecodeOutcome:
        reduce_to = decode_size_hint(header, size, policy) if self.cfg.reduced_decode else None
        return self._strict(data, header, reduce_to)


class TorchvisionDecoder(_ProbingDecoder):
    """torchvision.io's batched nvJPEG on CUDA; every other image (and every image on the CPU) takes the strict path.

    Only the JPEGs of a batch go to nvJPEG (in one call); PNGs and the rest take the strict CPU path beside them.
    Before each nvJPEG call the caller's stream is synchronised: torchvision allocates the outputs on the caller's
    stream but decodes on a private one that does not wait for it (pytorch/vision#9606), so memory that queued
    kernels still read could otherwise be overwritten.
    """

    name = "torchvision"

    def __init__(self, cfg: DecodeConfig, device: torch.device, executor: ThreadPoolExecutor) -> None:
        super().__init__(cfg, device, executor)
        import torchvision.io as tvio

        # torchvision 0.29 deprecates its decoders (for TorchCodec) and warns on every call; they work and are tested.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

        self._io: Any = tvio
        self._on_gpu = device.type == "cuda"

    def _takes(self, header: ImageHeader) -> bool:
        # Only JPEGs on a GPU (nvJPEG). torchvision's CPU PNG decoder crashes the process (SIGSEGV, torchvision
        # 0.29) on PNGs whose compressed data is corrupt, and its CPU JPEG decoder accepts truncated data.
        return header.fast_path_ok and header.format == "JPEG" and self._on_gpu

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        tvio = self._io
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if not self._on_gpu:  # only the start-up check (`_checked`) gets here: `_takes` sends nothing on the CPU
            return [_drop_alpha(tvio.decode_image(e, mode=tvio.ImageReadMode.UNCHANGED)) for e in encoded]
        if not all(d[:2] == b"\xff\xd8" for d in datas):
            raise ValueError("not a JPEG")  # `_takes` lets only JPEGs through; isolation names the odd one
        _sync_before_gpu_decode(self.device)
        decoded = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.UNCHANGED, device=self.device)
        return [_drop_alpha(t) for t in decoded]


def _sync_before_gpu_decode(device: torch.device) -> None:
    """Wait for the work queued on `device`'s current stream (the vision#9606 workaround)."""
    torch.cuda.current_stream(device).synchronize()


def _drop_alpha(t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] == 2:
        return t[:1]
    if t.shape[0] == 4:
        return t[:3]
    return t


class DaliDecoder(_ProbingDecoder):
    """NVIDIA DALI's image decoder: `mixed` (nvJPEG, hardware decoder where present) on CUDA, CPU otherwise.

    A DALI pipeline's external source is a FIFO: two threads that each `feed_input` then `run` the same pipeline
    can get each other's images (or a batch of the wrong size). So each pipeline is used by one thread at a time:
    a call takes an idle pipeline from a small pool (building one, up to `pipelines`, when none is idle) and holds
    it through feed, run and copy-out. EXIF orientation is ignored (`adjust_orientation=False`), as Pillow and
    torchvision do. On CUDA the outputs come back on the caller's current stream, without a host wait.
    """

    name = "dali"

    def __init__(
        self,
        cfg: DecodeConfig,
        device: torch.device,
        executor: ThreadPoolExecutor,
        max_batch: int,
        *,
        pipelines: int = 2,
    ) -> None:
        super().__init__(cfg, device, executor)
        from nvidia.dali import fn, pipeline_def, types

        self.max_batch = max_batch
        self._on_gpu = device.type == "cuda"
        device_id = None
        if self._on_gpu:
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        threads = max(1, cfg.workers or os.cpu_count() or 1)
        on_gpu = self._on_gpu

        @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def pipeline():  # type: ignore[no-untyped-def]
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
            return fn.decoders.image(
                encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )

        def build() -> object:
            pipe = pipeline()
            pipe.build()
            return pipe

        self._build = build
        self._max_pipelines = max(1, pipelines)
        self._idle: queue.LifoQueue[object] = queue.LifoQueue()
        self._built = 0
        self._pool_lock = threading.Lock()
        self._idle.put(build())  # the first one now, so that a broken DALI fails at start
        self._built = 1

    def _acquire(self) -> object:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._pool_lock:
            grow = self._built < self._max_pipelines
            if grow:
                self._built += 1
        if grow:
            try:
                return self._build()
            except BaseException:
                with self._pool_lock:
                    self._built -= 1
                raise
        return self._idle.get()

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor]:
        pipe: Any = self._acquire()
        try:
            return self._run(pipe, datas)
        finally:
            self._idle.put(pipe)

    def _run(self, pipe: Any, datas: list[bytes]) -> list[torch.Tensor]:
        encoded = [np.frombuffer(d, dtype=np.uint8) for d in datas]
        if not self._on_gpu:
            (out,) = pipe.run(encoded=encoded)
            return [torch.from_numpy(np.array(out[i])).permute(2, 0, 1).contiguous() for i in range(len(datas))]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        (out,) = pipe.run(stream, encoded=encoded)  # outputs ordered on `stream`: no host synchronisation
        tensors: list[torch.Tensor] = []
        for i in range(len(datas)):
            sample = out[i]
            hwc = torch.empty(tuple(sample.shape()), dtype=torch.uint8, device=self.device)
            feed_ndarray(sample, hwc, cuda_stream=stream)
            tensors.append(hwc.permute(2, 0, 1).contiguous())
        if len(tensors) != len(datas):
            raise RuntimeError(f"DALI returned {len(tensors)} images for {len(datas)}")
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
