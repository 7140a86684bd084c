"""Mutation fuzzing of decode, with hypothesis: the harness behind the fuzz test and `make fuzz SECONDS=...`.

Each example takes a valid seed image (every accepted format, or a corpus file), applies a few mutations (bit
flips, interesting bytes, truncation, insertion, deletion, duplication, splicing with another seed) and decodes
it between two good images through every CPU backend. The property: no exception escapes `decode`, the good
images come out unchanged, and the mutant is either a well-formed uint8 image or an `ImageError` with a known
reason and a message.

    python -m tests.unit.embedding.fuzz_decode --seconds 1800     # random seeds until time is up
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from PIL import Image

from service.config import DecodeConfig
from service.embedding.decode import Decoder, create_decoder
from service.errors import ImageError

BAD_DIR = Path(__file__).resolve().parents[2] / "data" / "bad"
REASONS = frozenset({"invalid_image", "unsupported_image", "image_too_large"})
SIZE = (224, 224)
FIXED_SEED = 20251111
# Small enough that a mutated header claiming a big image costs little memory; the property does not change.
FUZZ_CONFIG = {"max_pixels": 4_000_000}


def _image(h: int = 40, w: int = 56) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(7).integers(0, 60, (h, w))
    rgb = np.stack([x * 4 + noise, y * 5, (x + y) * 2 + noise], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def seed_inputs() -> list[bytes]:
    """Valid images of every accepted format and mode the decoders treat differently, plus the bad corpus."""
    img = _image()
    seeds = [
        _encode(img, "JPEG", quality=90),
        _encode(img, "JPEG", quality=75, progressive=True),
        _encode(img.convert("L"), "JPEG"),
        _encode(img.convert("CMYK"), "JPEG"),
        _encode(img, "JPEG", quality=80, subsampling=0, restart_marker_blocks=4),
        _encode(img, "PNG"),
        _encode(img.convert("L"), "PNG"),
        _encode(img.convert("P"), "PNG"),
        _encode(img.convert("RGBA"), "PNG"),
        _encode(img, "BMP"),
        _encode(img, "TIFF"),
        _encode(img, "TIFF", compression="tiff_lzw"),
        _encode(img, "TIFF", compression="jpeg"),
        _encode(img, "WEBP", quality=70),
        _encode(img, "WEBP", lossless=True),
    ]
    seeds += [p.read_bytes() for p in sorted(BAD_DIR.iterdir()) if p.suffix not in (".csv", ".py")]
    return [s for s in seeds if s]


_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[int]], int], donors: list[bytes]) -> bytes:
    """Apply 1-6 mutations chosen by `draw`; positions are relative to the current length."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        n = len(buf)
        kind = draw(st.integers(0, 7))
        pos = draw(st.integers(0, max(0, n - 1)))
        if kind == 0 and n:  # flip one bit
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1 and n:  # an interesting byte
            buf[pos] = _INTERESTING[draw(st.integers(0, len(_INTERESTING) - 1))]
        elif kind == 2:  # truncate
            del buf[pos:]
        elif kind == 3:  # insert random bytes
            buf[pos:pos] = bytes(draw(st.integers(0, 255)) for _ in range(draw(st.integers(1, 8))))
        elif kind == 4:  # delete a range
            del buf[pos : pos + draw(st.integers(1, 64))]
        elif kind == 5 and n:  # duplicate a range
            end = min(n, pos + draw(st.integers(1, 64)))
            buf[pos:pos] = buf[pos:end]
        elif kind == 6 and n >= 4:  # overwrite a 16- or 32-bit field with an extreme value
            width = 2 if draw(st.booleans()) else 4
            buf[pos : pos + width] = (b"\xff" if draw(st.booleans()) else b"\x00") * width
        elif kind == 7:  # splice the tail of another seed
            donor = donors[draw(st.integers(0, len(donors) - 1))]
            buf[pos:] = donor[draw(st.integers(0, max(0, len(donor) - 1))) :]
    return bytes(buf)


@dataclass
class Harness:
    """The decoders under test, the good image and its reference outputs, and counters."""

    decoders: list[Decoder]
    good: bytes
    references: list[torch.Tensor]
    seeds: list[bytes]
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def check(self, mutant: bytes) -> None:
        self.examples += 1
        for decoder, reference in zip(self.decoders, self.references, strict=True):
            outs = decoder.decode([self.good, mutant, self.good], SIZE, "squash")
            assert len(outs) == 3, f"{decoder.name}: {len(outs)} outcomes for 3 images"
            for out in (outs[0], outs[2]):
                assert isinstance(out, torch.Tensor) and torch.equal(out, reference), f"{decoder.name}: good image"
            out = outs[1]
            if isinstance(out, ImageError):
                assert out.reason in REASONS and out.message, f"{decoder.name}: {out!r}"
                key = out.reason
            else:
                assert isinstance(out, torch.Tensor), f"{decoder.name}: {type(out)}"
                assert out.dtype == torch.uint8 and out.dim() == 3 and out.shape[0] in (1, 3), tuple(out.shape)
                assert out.shape[1] > 0 and out.shape[2] > 0
                key = "decoded"
            self.outcomes[key] = self.outcomes.get(key, 0) + 1


def make_harness(pool: ThreadPoolExecutor, backends: tuple[str, ...] = ("pillow", "torchvision", "dali")) -> Harness:
    decoders = [
        create_decoder(DecodeConfig(backend=b, **FUZZ_CONFIG), torch.device("cpu"), pool, max_batch=4)  # type: ignore[arg-type]
        for b in backends
    ]
    good = _encode(_image(), "JPEG", quality=85)
    references = []
    for decoder in decoders:
        (ref,) = decoder.decode([good], SIZE, "squash")
        assert isinstance(ref, torch.Tensor)
        references.append(ref)
    return Harness(decoders=decoders, good=good, references=references, seeds=seed_inputs())


def run_fuzz(harness: Harness, seed: int, examples: int) -> None:
    """`examples` mutants from hypothesis seeded with `seed`; raises AssertionError naming the seed on failure."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(st.data())
    def one(data: st.DataObject) -> None:
        base = harness.seeds[data.draw(st.integers(0, len(harness.seeds) - 1))]
        harness.check(mutate(base, data.draw, harness.seeds))

    try:
        one()
    except Exception as e:
        raise AssertionError(
            f"decode fuzz failed with seed {seed}: reproduce with EMBEDSERVE_FUZZ_SEED={seed} ({type(e).__name__}: {e})"
        ) from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1800.0, help="stop starting new rounds after this long")
    parser.add_argument("--round", type=int, default=500, help="examples per hypothesis round (one seed each)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    rounds = 0
    with ThreadPoolExecutor(2) as pool:
        harness = make_harness(pool)
        while time.monotonic() - start < args.seconds:
            seed = random.SystemRandom().randrange(2**32)
            run_fuzz(harness, seed, args.round)
            rounds += 1
            elapsed = time.monotonic() - start
            print(
                f"{elapsed:7.0f} s  round {rounds} (seed {seed})  {harness.examples} inputs  {harness.outcomes}",
                flush=True,
            )
    print(f"done: {harness.examples} inputs in {rounds} rounds, {time.monotonic() - start:.0f} s, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
