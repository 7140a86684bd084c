"""Decoding: every input kind becomes the right pixels on every backend; bad images fail alone."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.config import DecodeConfig
from service.embedding.decode import Decoder, create_decoder, probe
from service.embedding.engine import Engine
from service.errors import ImageError, ImageTooLargeError, InvalidImageError
from tests.conftest import cpu_config, encode

BACKENDS = ["pillow", "torchvision", "dali"]
SIZE = (224, 224)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture(scope="module", params=BACKENDS)
def decoder(request: pytest.FixtureRequest, pool: ThreadPoolExecutor) -> Decoder:
    return create_decoder(DecodeConfig(backend=request.param), torch.device("cpu"), pool, max_batch=8)


def _png(pixels: np.ndarray, color_type: int, bit_depth: int, width: int | None = None) -> bytes:
    """A minimal PNG writer (independent of Pillow), for 16-bit colour and malformed headers."""
    height = pixels.shape[0]
    width = pixels.shape[1] if width is None else width
    big_endian = pixels.astype(">u2") if bit_depth == 16 else pixels.astype(np.uint8)
    raw = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _gradient_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=-1).astype(np.uint8)


def _as_rgb(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] in (1, 3)
    return t.expand(3, -1, -1).permute(1, 2, 0).numpy()


def _cases() -> list[tuple[str, bytes, np.ndarray, float]]:
    rgb = _gradient_rgb()
    gray = rgb[..., 0]
    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], axis=-1)
    rgb16 = rgb.astype(np.uint16) * 257
    gray16 = gray.astype(np.uint16) * 257
    cmyk = Image.fromarray(rgb).convert("CMYK")
    # name, bytes, expected RGB, tolerated mean absolute error (JPEG is lossy)
    return [
        ("jpeg-baseline-rgb", encode(Image.fromarray(rgb), quality=95), rgb, 3.0),
        ("jpeg-progressive-rgb", encode(Image.fromarray(rgb), quality=95, progressive=True), rgb, 3.0),
        ("jpeg-gray", encode(Image.fromarray(gray), quality=95), gray3, 2.0),
        ("jpeg-cmyk", encode(cmyk, quality=95), np.asarray(cmyk.convert("RGB")), 4.0),
        ("png-gray8", encode(Image.fromarray(gray), "PNG"), gray3, 0.0),
        ("png-rgb8", encode(Image.fromarray(rgb), "PNG"), rgb, 0.0),
        ("png-rgba8", encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb, 0.0),
        ("png-gray16", _png(gray16, color_type=0, bit_depth=16), gray3, 0.5),
        ("png-rgb16", _png(rgb16, color_type=2, bit_depth=16), rgb, 0.5),
    ]


CASES = _cases()


@pytest.mark.parametrize(("name", "data", "expected", "tolerance"), CASES, ids=[c[0] for c in CASES])
def test_every_input_kind_decodes_to_its_pixels(
    decoder: Decoder, name: str, data: bytes, expected: np.ndarray, tolerance: float
) -> None:
    (out,) = decoder.decode([data], SIZE, "squash")
    assert not isinstance(out, ImageError), f"{name}: {out}"
    got = _as_rgb(out)
    assert got.shape == expected.shape
    error = np.abs(got.astype(np.int32) - expected.astype(np.int32)).mean()
    assert error <= tolerance, f"{name}: mean abs error {error:.2f} > {tolerance}"


def _bad_inputs() -> list[tuple[str, bytes, type[ImageError]]]:
    good = encode(Image.fromarray(_gradient_rgb()), quality=90)
    return [
        ("empty", b"", InvalidImageError),
        ("not-an-image", b"hello, I am a text file" * 10, InvalidImageError),
        ("truncated-jpeg", good[: len(good) // 2], InvalidImageError),
        ("corrupt-jpeg", good[:2] + bytes(range(256)) * 8, InvalidImageError),
        ("zero-size-png", _png(np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, width=0), InvalidImageError),
        (
            "bomb-png",
            _png(np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, width=200_000_000),
            ImageTooLargeError,
        ),
    ]


BAD = _bad_inputs()


@pytest.mark.parametrize(("name", "data", "error_type"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_fails_alone_in_a_mixed_batch(
    decoder: Decoder, name: str, data: bytes, error_type: type[ImageError]
) -> None:
    good = encode(Image.fromarray(_gradient_rgb()), quality=90)
    outs = decoder.decode([good, data, good], SIZE, "squash")
    assert isinstance(outs[1], error_type), f"{name}: got {outs[1]!r}"
    assert outs[1].message
    for ok in (outs[0], outs[2]):
        assert isinstance(ok, torch.Tensor)
        assert ok.shape == (3, 48, 64)


def test_probe_reports_size_without_decoding() -> None:
    header = probe(_png(np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, width=40_000), max_pixels=10**9)
    assert (header.format, header.width, header.height) == ("PNG", 40_000, 1)
    with pytest.raises(ImageTooLargeError, match="max_pixels=1000"):
        probe(_png(np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, width=40_000), max_pixels=1000)


def test_engine_mixed_batch_keeps_good_vectors(engine: Engine, oct_files: list[Path]) -> None:
    good = [f.read_bytes() for f in oct_files[:2]]
    alone = engine.embed(good)
    mixed = engine.embed([good[0], b"", good[1][:5000], b"\xff\xd8garbage", good[1]])
    assert [o.ok for o in mixed] == [True, False, False, False, True]
    assert all(o.error is not None and o.error.reason == "invalid_image" for o in mixed[1:4])
    assert mixed[0].vector is not None and alone[0].vector is not None
    assert mixed[4].vector is not None and alone[1].vector is not None
    np.testing.assert_allclose(mixed[0].vector, alone[0].vector, atol=1e-5)
    np.testing.assert_allclose(mixed[4].vector, alone[1].vector, atol=1e-5)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_backends_give_the_same_embeddings(backend: str, oct_embeddings: np.ndarray, oct_files: list[Path]) -> None:
    other = Engine.from_config(cpu_config(decode__backend=backend))
    try:
        assert other.info.decode_backend == f"{backend}-cpu"
        outcomes = other.embed([f.read_bytes() for f in oct_files])
        vectors = np.stack([o.vector for o in outcomes if o.vector is not None])
    finally:
        other.close()
    cosine = (vectors * oct_embeddings).sum(axis=1)
    assert cosine.min() >= 0.99, f"{backend} vs pillow: min cosine {cosine.min():.4f}"


def test_reduced_jpeg_decode_stays_close(oct_embeddings: np.ndarray, oct_files: list[Path]) -> None:
    fast = Engine.from_config(cpu_config(decode__reduced_decode=True))
    try:
        outcomes = fast.embed([f.read_bytes() for f in oct_files])
    finally:
        fast.close()
    vectors = np.stack([o.vector for o in outcomes if o.vector is not None])
    cosine = (vectors * oct_embeddings).sum(axis=1)
    assert cosine.min() >= 0.98, f"reduced decode: min cosine {cosine.min():.4f}"
