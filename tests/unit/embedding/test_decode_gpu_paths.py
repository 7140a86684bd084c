"""The DALI and torchvision decoders' GPU-path logic, replayed on the CPU: the DALI pipeline driven by several
threads at once (prefetch_batches = 2), EXIF orientation, and which images of a batch go to nvJPEG."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from service.config import DecodeConfig
from service.embedding import decode as decode_module
from service.embedding.decode import DaliDecoder, TorchvisionDecoder
from service.errors import ImageError

pytest.importorskip("nvidia.dali", reason="DALI (a core dependency) is not installed")


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _png(seed: int, h: int = 20, w: int = 24) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), pixels.transpose(2, 0, 1)


def test_dali_pipeline_driven_by_two_threads_returns_each_its_own_images(pool: ThreadPoolExecutor) -> None:
    """Two prepare threads feed the same pipelines: each must get exactly its images back, in its order."""
    decoder = DaliDecoder(DecodeConfig(backend="dali", workers=1), torch.device("cpu"), pool, max_batch=4)
    # PNGs take DALI on the CPU (JPEGs take the strict path there); batch sizes differ so a swap also shows as
    # a wrong count, and every image is distinct so a same-size swap shows in the pixels.
    batches = [[_png(100 * t + i, h=16 + t) for i in range(3 - t)] for t in range(2)]
    errors: list[str] = []
    start = threading.Barrier(2)

    def drive(t: int) -> None:
        start.wait()
        datas = [d for d, _ in batches[t]]
        for round_ in range(40):
            try:
                out = decoder._decode_batch(datas)
            except Exception as e:  # the race shows as IndexError / RuntimeError from DALI
                errors.append(f"thread {t} round {round_}: {type(e).__name__}: {e}")
                return
            if len(out) != len(datas) or any(
                tuple(o.shape) != want.shape or not np.array_equal(o.numpy(), want)
                for o, (_, want) in zip(out, batches[t], strict=False)
            ):
                errors.append(f"thread {t} round {round_}: got another thread's images")
                return

    threads = [threading.Thread(target=drive, args=(t,), daemon=True) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "decode threads hung"
    assert not errors, errors


def _exif_rotated_jpeg() -> bytes:
    """A 40x20 (w x h) JPEG whose EXIF says 'rotate 90° clockwise to display' (orientation 6)."""
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 10, 20))  # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_dali_keeps_the_stored_orientation_like_pillow(pool: ThreadPoolExecutor) -> None:
    """DALI rotates by EXIF by default; Pillow and torchvision do not: every backend must give the same pixels."""
    data = _exif_rotated_jpeg()
    decoder = DaliDecoder(DecodeConfig(backend="dali"), torch.device("cpu"), pool, max_batch=2)
    (dali,) = decoder._decode_batch([data])  # the DALI path itself (on the CPU, decode() sends JPEGs to Pillow)
    header = decode_module.probe(data, 10**8)
    strict = decode_module.decode_cpu(data, header)
    assert tuple(dali.shape) == tuple(strict.shape) == (3, 20, 40)
    assert (dali.int() - strict.int()).abs().float().mean() < 3.0


class _FakeTvio:
    """torchvision.io as seen on a GPU: records what the nvJPEG batch call got."""

    class ImageReadMode:
        UNCHANGED = 0

    def __init__(self) -> None:
        self.gpu_batches: list[int] = []

    def decode_jpeg(self, encoded: list[torch.Tensor], *, mode: int, device: torch.device) -> list[torch.Tensor]:
        self.gpu_batches.append(len(encoded))
        import torchvision.io as tvio

        return [tvio.decode_jpeg(e, mode=tvio.ImageReadMode.UNCHANGED) for e in encoded]

    def decode_image(self, encoded: torch.Tensor, *, mode: int) -> torch.Tensor:
        raise AssertionError("non-JPEG images must not reach torchvision's decode_image")


def test_torchvision_sends_only_the_jpegs_of_a_mixed_batch_to_nvjpeg(
    pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = TorchvisionDecoder(DecodeConfig(backend="torchvision"), torch.device("cpu"), pool)
    fake = _FakeTvio()
    decoder._io = fake  # type: ignore[assignment]
    monkeypatch.setattr(decoder, "_on_gpu", True)
    monkeypatch.setattr(decode_module, "_sync_before_gpu_decode", lambda device: None)
    jpegs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (40 * i, 90, 160)).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    png, png_pixels = _png(7)
    out = decoder.decode([jpegs[0], png, jpegs[1], jpegs[2]], (24, 32), "squash")
    assert fake.gpu_batches == [3]  # one nvJPEG batch of the three JPEGs; the PNG took the CPU path
    assert not any(isinstance(o, ImageError) for o in out)
    assert np.array_equal(out[1].numpy(), png_pixels)
    assert [tuple(o.shape) for o in out] == [(3, 24, 32), (3, 20, 24), (3, 24, 32), (3, 24, 32)]
