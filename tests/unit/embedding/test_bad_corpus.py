"""The bad-image corpus: every file fails alone, with its expected reason, through every backend and the engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from service.config import DecodeConfig
from service.embedding.decode import Decoder, create_decoder
from service.embedding.engine import Engine
from service.errors import ImageError
from tests.unit.embedding.bad_corpus import BAD_DIR, bad_files

BAD = bad_files()
SIZE = (224, 224)
# The three crash inputs, by the exception Pillow raised for them.
CRASHERS = {
    "crash-tiff-stripoffsets-double.tif": "TypeError",
    "crash-dds-pixel-format-flags-0.dds": "NotImplementedError",
    "crash-spider-stack-image.spi": "AttributeError",
}


def test_corpus_is_small_complete_and_has_the_crashers() -> None:
    on_disk = {p.name for p in BAD_DIR.iterdir()} - {"manifest.csv", "make_corpus.py"}
    assert on_disk == {f.name for f in BAD}, "manifest.csv and the files disagree; re-run make_corpus.py"
    assert sum((BAD_DIR / f.name).stat().st_size for f in BAD) < 1_000_000
    assert set(CRASHERS) <= on_disk
    assert {f.expected_reason for f in BAD} == {"invalid_image", "unsupported_image", "image_too_large"}


def test_the_crashers_crash_plain_pillow() -> None:
    """The reference: without decode's guards, Pillow raises exactly what the issue reported."""
    import io

    from PIL import Image

    for name, kind in CRASHERS.items():
        with pytest.raises(Exception) as info, Image.open(io.BytesIO((BAD_DIR / name).read_bytes())) as img:
            img.load()
        assert type(info.value).__name__ == kind, name


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture(scope="module", params=["pillow", "torchvision", "dali"])
def decoder(request: pytest.FixtureRequest, pool: ThreadPoolExecutor) -> Decoder:
    return create_decoder(DecodeConfig(backend=request.param), torch.device("cpu"), pool, max_batch=8)


def test_every_corpus_file_fails_alone_with_its_reason(decoder: Decoder, oct_files: list[Path]) -> None:
    good = oct_files[0].read_bytes()
    (alone,) = decoder.decode([good], SIZE, "squash")
    assert isinstance(alone, torch.Tensor)
    datas = [good] + [f.data for f in BAD] + [good]
    outs = decoder.decode(datas, SIZE, "squash")
    assert len(outs) == len(datas)
    for f, out in zip(BAD, outs[1:-1], strict=True):
        assert isinstance(out, ImageError), f"{decoder.name}: {f.name} decoded to {getattr(out, 'shape', out)}"
        assert out.reason == f.expected_reason, f"{decoder.name}: {f.name}: {out.reason}: {out.message}"
        assert out.message and "Traceback" not in out.message and "/" not in out.message.split(":")[0]
    for out in (outs[0], outs[-1]):
        assert isinstance(out, torch.Tensor) and torch.equal(out, alone)


def test_unexpected_exception_types_get_a_safe_message_and_their_type_in_the_log(
    decoder: Decoder, caplog: pytest.LogCaptureFixture
) -> None:
    data = (BAD_DIR / "crash-tiff-stripoffsets-double.tif").read_bytes()
    with caplog.at_level(logging.DEBUG, logger="service.embedding.decode"):
        (out,) = decoder.decode([data], SIZE, "squash")
    assert isinstance(out, ImageError) and out.reason == "invalid_image"
    assert "TIFF" in out.message and "float" not in out.message and "integer" not in out.message
    assert any("TypeError" in r.getMessage() for r in caplog.records)


def _pillow_says(data: bytes) -> str:
    """What Pillow with all its plugins identifies the bytes as (the independent reference for the name)."""
    import io
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Pillow deprecates some of these formats
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format)


def test_unsupported_formats_are_named(decoder: Decoder) -> None:
    for f in BAD:
        if f.expected_reason != "unsupported_image":
            continue
        (out,) = decoder.decode([f.data], SIZE, "squash")
        assert isinstance(out, ImageError)
        name = "DDS" if f.name in CRASHERS else _pillow_says(f.data)
        assert out.message.startswith(f"{name} images are not accepted"), (f.name, out.message)


def test_engine_prepare_keeps_good_images_next_to_the_whole_corpus(engine: Engine, oct_files: list[Path]) -> None:
    goods = [oct_files[0].read_bytes(), oct_files[20].read_bytes()]
    alone = engine.embed(goods)
    datas = [goods[0], *(f.data for f in BAD), goods[1]]
    prepared = engine.prepare(datas)
    assert prepared.size == len(datas)
    assert prepared.ok_positions == [0, len(datas) - 1]
    for i, f in enumerate(BAD, start=1):
        assert prepared.errors[i].reason == f.expected_reason, f.name
    outcomes = engine.run(prepared)
    for got, want in ((outcomes[0], alone[0]), (outcomes[-1], alone[1])):
        assert got.vector is not None and want.vector is not None
        np.testing.assert_allclose(got.vector, want.vector, atol=1e-5)


class _RaisingDecoder:
    """A decoder with a bug: it raises for any batch holding b"bug" (as the old decode did for the crashers)."""

    def __init__(self, inner: Decoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device

    def decode(self, datas, size, policy):  # type: ignore[no-untyped-def]
        if b"bug" in datas:
            raise AttributeError("'SpiderImageFile' object has no attribute 'stkoffset'")
        return self.inner.decode(datas, size, policy)


def test_engine_turns_a_raising_decoder_into_that_images_error(engine: Engine, oct_files: list[Path]) -> None:
    good = oct_files[3].read_bytes()
    original = engine.decoder
    engine.decoder = _RaisingDecoder(original)  # type: ignore[assignment]
    try:
        prepared = engine.prepare([good, b"bug", good])
    finally:
        engine.decoder = original
    assert prepared.ok_positions == [0, 2]
    assert prepared.errors[1].reason == "invalid_image"
    assert "stkoffset" not in prepared.errors[1].message


def test_a_fatal_device_error_is_not_an_image_error(engine: Engine) -> None:
    class _DeadDecoder(_RaisingDecoder):
        def decode(self, datas, size, policy):  # type: ignore[no-untyped-def]
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    original = engine.decoder
    engine.decoder = _DeadDecoder(original)  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            engine.prepare([b"x"])
    finally:
        engine.decoder = original


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG paths of torchvision and DALI)")
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_gpu_decoders_refuse_the_corpus_too(backend: str, pool: ThreadPoolExecutor, oct_files: list[Path]) -> None:
    """On a GPU, JPEGs go to nvJPEG after the probe's checks: it must refuse what the strict CPU path refuses."""
    try:
        decoder = create_decoder(DecodeConfig(backend=backend), torch.device("cuda"), pool, max_batch=8)  # type: ignore[arg-type]
    except ValueError as e:  # ConfigError: the backend does not build on this machine (DALI is not everywhere)
        pytest.skip(f"{backend} does not build here: {e}")
    good = oct_files[0].read_bytes()
    outs = decoder.decode([good, *(f.data for f in BAD), good], SIZE, "squash")
    wrong = [
        (f.name, getattr(out, "reason", "decoded"))
        for f, out in zip(BAD, outs[1:-1], strict=True)
        if getattr(out, "reason", "decoded") != f.expected_reason
    ]
    assert wrong == []
    assert isinstance(outs[0], torch.Tensor) and isinstance(outs[-1], torch.Tensor)
