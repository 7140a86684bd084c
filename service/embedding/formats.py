"""Which image formats decode accepts, what Pillow may load to read them, and cheap structural checks.

Every Pillow plugin is attack surface: its parser runs on untrusted bytes. Decode therefore opens images only
with `Image.open(fp, formats=...)` over the configured `decode.formats`, and `register_formats` imports exactly
those formats' plugins when a decoder is built, so Pillow never needs `Image.init()` (which imports all ~40
plugins) on the decode path. Pillow's own `preinit()`, run inside every `Image.open`, still imports its five
common plugins (BMP, GIF, JPEG, PPM, PNG); the ones not allowed are registered but never tried. Other Pillow
users in the process (the HTML report's thumbnails, tests that encode inputs) are untouched: nothing is removed
from Pillow's registry.

Bytes that no allowed plugin identifies are named with `sniff_format`, a table of magic numbers that needs no
plugin, so that a GIF is refused as an unsupported GIF rather than as garbage.
"""

from __future__ import annotations

import importlib
import logging
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from service.errors import ConfigError

logger = logging.getLogger(__name__)

# Plugin modules whose name is not `<Format>ImagePlugin` with the format name capitalised.
_IRREGULAR_PLUGINS = {
    "DIB": "Bmp",
    "BUFR": "BufrStub",
    "GRIB": "GribStub",
    "HDF5": "Hdf5Stub",
    "JPEG2000": "Jpeg2K",
    "MCIDAS": "McIdas",
    "WEBP": "WebP",
    "XVTHUMB": "XVThumb",
}


def plugin_module(fmt: str) -> str:
    """The Pillow module that registers the reader of format `fmt` (a Pillow format name such as `JPEG`)."""
    stem = _IRREGULAR_PLUGINS.get(fmt, fmt.capitalize())
    return f"PIL.{stem}ImagePlugin"


def register_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """Import the Pillow plugin of each format, and no other; return the formats, upper-cased.

    Once every allowed format is in `Image.OPEN`, `Image.open(fp, formats=...)` never falls back to `Image.init()`.
    Raises `ConfigError` when this Pillow cannot read one of them (a plugin that needs a library Pillow was built
    without).
    """
    names = tuple(f.upper() for f in formats)
    for fmt in names:
        if fmt in Image.OPEN:
            continue
        try:
            importlib.import_module(plugin_module(fmt))
        except ImportError as e:
            raise ConfigError(f"decode.formats includes {fmt}, which this Pillow cannot read ({e}); remove it") from e
        if fmt not in Image.OPEN:
            raise ConfigError(f"decode.formats includes {fmt}, which this Pillow cannot read; remove it")
    logger.debug("Pillow readers registered for decode: %s", ", ".join(names))
    return names


def canonical_format(pillow_format: str | None) -> str:
    """Pillow's name for what it opened, folded onto the format that was asked for (an MPO file is a JPEG)."""
    name = str(pillow_format or "")
    return "JPEG" if name == "MPO" else name


# (offset, magic, format): enough to name what a file is without running any parser on it.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "TIFF"),
    (0, b"MM\x00+", "TIFF"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"\x01\xda", "SGI"),
    (0, b"qoif", "QOI"),
    (0, b"Image type:", "IM"),
    (0, b"DDS ", "DDS"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG2000"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JXL"),
    (0, b"\xff\x0a", "JXL"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypavis", "AVIF"),
    (4, b"ftypheic", "HEIF"),
    (4, b"ftypheix", "HEIF"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"icns", "ICNS"),
    (0, b"%!PS", "EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"BLP1", "BLP"),
    (0, b"BLP2", "BLP"),
    (0, b"SIMPLE  =", "FITS"),
    (0, b"gimp xcf", "XCF"),
    (0, b"\x76\x2f\x31\x01", "EXR"),
    (0, b"#?RADIANCE", "HDR"),
    (0, b"#define", "XBM"),
    (0, b"/* XPM */", "XPM"),
    (0, b"DanM", "MSP"),
    (0, b"LinS", "MSP"),
    (0, b"\x59\xa6\x6a\x95", "SUN"),
)
_TGA_FOOTER = b"TRUEVISION-XFILE.\x00"


def sniff_format(data: bytes) -> str | None:
    """The format `data` claims to be by its magic number, or None. Runs no parser: safe on any bytes."""
    if data.endswith(_TGA_FOOTER):  # before the table: a TGA's first bytes can look like an ICO's or a CUR's
        return "TGA"
    for offset, magic, fmt in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return fmt
    if data[:2] == b"BM" and len(data) >= 14:
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"1234567fF" and data[2:3] in b" \t\r\n":
        return "PPM"
    if len(data) >= 4 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5) and data[2] == 1:
        return "PCX"
    return None


@dataclass(frozen=True, slots=True)
class JpegFrame:
    """What a JPEG's frame header and first scan header say, read by walking the marker segments."""

    sof: int
    """The start-of-frame marker's second byte: 0xC0 baseline, 0xC2 progressive, 0xC9.. arithmetic coding."""
    width: int
    height: int
    scan_start: int
    """Offset of the first byte of entropy-coded data (after the first SOS segment)."""

    @property
    def huffman(self) -> bool:
        """True for Huffman-coded frames (every frame type but the arithmetic-coded ones)."""
        return self.sof not in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)

    def min_entropy_bytes(self) -> int:
        """A lower bound on the entropy-coded bytes of a complete image.

        With Huffman coding every 8x8 block of the full-resolution component costs at least one bit (its DC
        code, in a sequential scan and in a progressive first DC scan alike), so fewer bytes than blocks / 8
        cannot hold the whole image, whatever the content.
        """
        if not self.huffman:
            return 0
        blocks = math.ceil(self.width / 8) * math.ceil(self.height / 8)
        return math.ceil(blocks / 8)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """Walk the marker segments of a JPEG up to the first scan; None when they are malformed or missing."""
    pos = 2
    sof: tuple[int, int, int] | None = None
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == 0xD9 or pos + 2 > end:
            return None
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > end:
            return None
        if marker in _SOF_MARKERS and length >= 8:
            height, width = struct.unpack_from(">HH", data, pos + 3)
            sof = (marker, width, height)
        if marker == 0xDA:
            if sof is None:
                return None
            return JpegFrame(sof=sof[0], width=sof[1], height=sof[2], scan_start=pos + length)
        pos += length
    return None
