"""Write the corpus of crafted bad images and its manifest: `python tests/data/bad/make_corpus.py [DIR]`.

Deterministic: fixed seeds, and every mutation is at a position computed from the file's own structure, so the
expected outcome of each file follows from what was done to it, not from what a decoder happened to say:
- `invalid_image`: the bytes are not a complete, well-formed image of an accepted format (truncated, a header
  field made impossible, entropy data with an impossible Huffman code, or no recognisable format at all);
- `unsupported_image`: a well-formed image (or a crash input) of a format embedserve does not accept;
- `image_too_large`: a header that claims more pixels than `decode.max_pixels` (50 million by default).
The encoders are Pillow's, so another Pillow version may write other bytes; the checked-in files are the corpus.
"""

from __future__ import annotations

import csv
import io
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SEED = 20_251_111


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=-1).astype(np.uint8)


def textured(h: int, w: int, seed: int = SEED) -> np.ndarray:
    """A gradient plus noise: realistic entropy data, not a flat image that compresses to nothing."""
    noise = np.random.default_rng(seed).integers(-40, 40, (h, w, 3))
    return np.clip(gradient(h, w).astype(np.int64) + noise, 0, 255).astype(np.uint8)


def save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def jpeg(**params: object) -> bytes:
    return save(Image.fromarray(textured(48, 64)), "JPEG", quality=90, **params)


# -- JPEG structure --------------------------------------------------------------------------------------------


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the marker, offset after its segment) up to and including the first SOS."""
    out: list[tuple[int, int, int]] = []
    pos = 2
    while True:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        out.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:
            return out
        pos += 2 + length


def segment(data: bytes, marker: int) -> tuple[int, int]:
    for m, start, end in jpeg_segments(data):
        if m == marker:
            return start, end
    raise ValueError(f"no marker {marker:#x}")


def scan_range(data: bytes) -> tuple[int, int]:
    """Offsets of the first scan's entropy-coded data (from after SOS to the EOI at the end)."""
    _, sos_end = segment(data, 0xDA)
    return sos_end, len(data) - 2


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def sof_size(data: bytes, width: int, height: int) -> bytes:
    start, _ = segment(data, 0xC0)
    return patch(data, start + 5, struct.pack(">HH", height, width))


def bad_huffman(data: bytes) -> bytes:
    """48 one-bits (FF 00 stuffed, six times) mid-scan: no Huffman code is all ones, so no decoder can read past."""
    lo, hi = scan_range(data)
    mid = (lo + hi) // 2
    return patch(data, mid, b"\xff\x00" * 6)


def progressive_bad_huffman(data: bytes) -> bytes:
    """The same in the first (DC) scan of a progressive JPEG, which ends at the next marker."""
    _, sos_end = segment(data, 0xDA)
    nxt = data.index(b"\xff", sos_end)
    while data[nxt + 1] == 0x00:
        nxt = data.index(b"\xff", nxt + 2)
    mid = (sos_end + nxt) // 2
    return data[:mid] + b"\xff\x00" * 6 + data[mid:]


# -- PNG structure ---------------------------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png(width: int, height: int, raw_rows: bytes, *, bit_depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw_rows, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_rgb(pixels: np.ndarray) -> bytes:
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
    return png(w, h, raw)


def png16(gray: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG (Pillow writes none from numpy)."""
    wide = gray.astype(">u2") * 257
    raw = b"".join(b"\x00" + wide[y].tobytes() for y in range(gray.shape[0]))
    return png(gray.shape[1], gray.shape[0], raw, bit_depth=16, color_type=0)


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the chunk, offset of its body)."""
    out = []
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], pos, pos + 8))
        pos += 12 + length
    return out


def png_body_offset(data: bytes, kind: bytes) -> int:
    return next(body for k, _, body in png_chunks(data) if k == kind)


def png_fix_crc(data: bytes, kind: bytes) -> bytes:
    start = next(s for k, s, _ in png_chunks(data) if k == kind)
    (length,) = struct.unpack_from(">I", data, start)
    crc = zlib.crc32(data[start + 4 : start + 8 + length]) & 0xFFFFFFFF
    return patch(data, start + 8 + length, struct.pack(">I", crc))


def png_flip_ihdr_unchecked() -> bytes:
    """The width's low byte changed and the CRC left as it was."""
    return patch(png_rgb(gradient()), 16 + 3, b"\x41")


def png_flip_zlib_header() -> bytes:
    """The zlib stream's first byte changed (its FCHECK then fails), with the chunk's CRC fixed up."""
    data = png_rgb(gradient())
    return png_fix_crc(patch(data, png_body_offset(data, b"IDAT"), b"\x79"), b"IDAT")


def png_flip_idat_unchecked() -> bytes:
    """One byte of the compressed pixels inverted and the chunk's CRC left as it was."""
    data = png_rgb(textured(48, 64))
    at = png_body_offset(data, b"IDAT") + 40
    return patch(data, at, bytes([data[at] ^ 0xFF]))


def png_short_idat() -> bytes:
    """A PNG whose deflate stream stops halfway, with valid CRCs and an IEND: the pixel data just ends."""
    pixels = textured(48, 64)
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(48))
    idat = zlib.compress(raw, 9)
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat[: len(idat) // 2]) + chunk(b"IEND", b"")


def png_zeros_bomb(side: int) -> bytes:
    """A real decompression bomb: `side` x `side` grey zeros, about a thousand to one."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# -- TIFF structure --------------------------------------------------------------------------------------------


def tiff_entries(data: bytes) -> dict[int, int]:
    """Tag -> offset of its 12-byte IFD entry, for a little-endian TIFF's first IFD."""
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    return {struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0]: ifd + 2 + 12 * i for i in range(count)}


def tiff() -> bytes:
    return save(Image.fromarray(textured(64, 64)), "TIFF")


def tiff_field_type(data: bytes, tag: int, new_type: int) -> bytes:
    return patch(data, tiff_entries(data)[tag] + 2, struct.pack("<H", new_type))


def tiff_value(data: bytes, tag: int, value: int) -> bytes:
    """Set a single-valued tag to `value`, as a LONG."""
    entry = tiff_entries(data)[tag]
    return patch(data, entry + 2, struct.pack("<HII", 4, 1, value))


# -- other formats ---------------------------------------------------------------------------------------------


def dds_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel format flags are 0: Pillow raised NotImplementedError out of Image.open."""
    header = bytearray(124)
    struct.pack_into("<I", header, 0, 124)  # dwSize
    struct.pack_into("<3I", header, 4, 0x1007, 8, 8)  # flags, height, width
    struct.pack_into("<I", header, 72, 32)  # ddspf.dwSize; ddspf.dwFlags stays 0
    return b"DDS " + bytes(header) + b"\x00" * 256


def spider_stack_image() -> bytes:
    """A SPIDER header of an image inside a stack with no stack offset: Pillow raised AttributeError on open."""
    h = [0.0] * 27
    values = {1: 8.0, 2: 8.0, 5: 1.0, 12: 8.0, 13: 1.0, 22: 1024.0, 23: 1024.0, 24: 0.0, 27: 1.0}
    for index, value in values.items():
        h[index - 1] = value
    return struct.pack(">27f", *h) + b"\x00" * (1024 - 27 * 4) + b"\x00" * (8 * 8 * 4)


def psd_header() -> bytes:
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3) + b"\x00" * 64


def webp() -> bytes:
    return save(Image.fromarray(textured(48, 64)), "WEBP", quality=80)


def webp_bad_keyframe(data: bytes) -> bytes:
    start = data.index(b"\x9d\x01\x2a")
    return patch(data, start, b"\x9d\x01\x2b")


def odd(fmt: str, mode: str = "RGB", **params: object) -> Callable[[], bytes]:
    return lambda: save(Image.fromarray(textured(16, 16)).convert(mode), fmt, **params)


def jpeg_7000(eoi: bool) -> bytes:
    """A 7000x7000 JPEG cut to 35 KB (the issue's repro): libjpeg fills the missing 99 % with grey."""
    tile = np.random.default_rng(SEED).integers(0, 256, (875, 875), dtype=np.uint8)
    big = Image.fromarray(np.kron(tile, np.ones((8, 8), np.uint8)), "L")
    data = save(big, "JPEG", quality=80)[:35_000]
    return data + b"\xff\xd9" if eoi else data


# -- the corpus ------------------------------------------------------------------------------------------------

CORPUS: list[tuple[str, str, Callable[[], bytes]]] = [
    # The three crashers of the reliability issue.
    ("crash-tiff-stripoffsets-double.tif", "invalid_image", lambda: tiff_field_type(tiff(), 273, 12)),
    ("crash-dds-pixel-format-flags-0.dds", "unsupported_image", dds_unknown_pixel_format),
    ("crash-spider-stack-image.spi", "invalid_image", spider_stack_image),
    # Truncations.
    ("trunc-jpeg-half.jpg", "invalid_image", lambda: jpeg()[: len(jpeg()) // 2]),
    ("trunc-jpeg-half-eoi.jpg", "invalid_image", lambda: jpeg()[: len(jpeg()) // 2] + b"\xff\xd9"),
    ("trunc-jpeg-7000x7000-35k.jpg", "invalid_image", lambda: jpeg_7000(eoi=False)),
    ("trunc-jpeg-7000x7000-35k-eoi.jpg", "invalid_image", lambda: jpeg_7000(eoi=True)),
    ("trunc-jpeg-headers-only.jpg", "invalid_image", lambda: jpeg()[: segment(jpeg(), 0xDA)[1]]),
    ("trunc-jpeg-headers-only-eoi.jpg", "invalid_image", lambda: jpeg()[: segment(jpeg(), 0xDA)[1]] + b"\xff\xd9"),
    (
        "trunc-jpeg-progressive-half-eoi.jpg",
        "invalid_image",
        lambda: jpeg(progressive=True)[: len(jpeg(progressive=True)) // 2] + b"\xff\xd9",
    ),
    (
        "trunc-jpeg-cmyk-half-eoi.jpg",
        "invalid_image",
        lambda: (d := save(Image.fromarray(textured(48, 64)).convert("CMYK"), "JPEG"))[: len(d) // 2] + b"\xff\xd9",
    ),
    ("trunc-png-half.png", "invalid_image", lambda: (d := png_rgb(textured(48, 64)))[: len(d) // 2]),
    ("trunc-png-idat-short-with-iend.png", "invalid_image", png_short_idat),
    ("trunc-png-no-idat.png", "invalid_image", lambda: (d := png_rgb(gradient()))[: png_chunks(d)[1][1]]),
    (
        "trunc-png16-half.png",
        "invalid_image",
        lambda: (d := png16(textured(48, 64)[..., 0]))[: len(d) // 2],
    ),
    (
        "trunc-bmp-half.bmp",
        "invalid_image",
        lambda: (d := save(Image.fromarray(textured(48, 64)), "BMP"))[: len(d) // 2],
    ),
    ("trunc-tiff-half.tif", "invalid_image", lambda: tiff()[: len(tiff()) // 2]),
    ("trunc-webp-half.webp", "invalid_image", lambda: webp()[: len(webp()) // 2]),
    # Header fields made impossible.
    ("flip-jpeg-sof-enlarged.jpg", "invalid_image", lambda: sof_size(jpeg(), 640, 480)),
    ("flip-jpeg-sof-no-components.jpg", "invalid_image", lambda: patch(jpeg(), segment(jpeg(), 0xC0)[0] + 9, b"\x00")),
    ("flip-jpeg-sof-precision-9.jpg", "invalid_image", lambda: patch(jpeg(), segment(jpeg(), 0xC0)[0] + 4, b"\x09")),
    (
        "flip-jpeg-sos-unknown-component.jpg",
        "invalid_image",
        lambda: patch(jpeg(), segment(jpeg(), 0xDA)[0] + 5, b"\x09"),
    ),
    # Three codes of length 1 cannot exist (only "0" and "1"): libjpeg refuses the table.
    (
        "flip-jpeg-dht-overfull-table.jpg",
        "invalid_image",
        lambda: patch(jpeg(), segment(jpeg(), 0xC4)[0] + 5, b"\x03"),
    ),
    ("flip-png-ihdr-crc.png", "invalid_image", png_flip_ihdr_unchecked),
    (
        "flip-png-ihdr-bit-depth-3.png",
        "invalid_image",
        lambda: png_fix_crc(patch(png_rgb(gradient()), 24, b"\x03"), b"IHDR"),
    ),
    ("flip-png-zlib-header.png", "invalid_image", png_flip_zlib_header),
    ("flip-png-idat-crc.png", "invalid_image", png_flip_idat_unchecked),
    (
        "flip-bmp-bits-per-pixel-23.bmp",
        "invalid_image",
        lambda: patch(save(Image.fromarray(gradient()), "BMP"), 28, struct.pack("<H", 23)),
    ),
    ("flip-tiff-compression-999.tif", "invalid_image", lambda: tiff_value(tiff(), 259, 999)),
    ("flip-tiff-strip-offset-past-end.tif", "invalid_image", lambda: tiff_value(tiff(), 273, 10_000_000)),
    ("flip-webp-keyframe-start-code.webp", "invalid_image", lambda: webp_bad_keyframe(webp())),
    # Entropy-coded data with an impossible code.
    ("entropy-jpeg-bad-huffman.jpg", "invalid_image", lambda: bad_huffman(jpeg())),
    (
        "entropy-jpeg-progressive-bad-huffman.jpg",
        "invalid_image",
        lambda: progressive_bad_huffman(jpeg(progressive=True)),
    ),
    (
        "entropy-jpeg-large-bad-huffman.jpg",
        "invalid_image",
        lambda: bad_huffman(save(Image.fromarray(textured(240, 320)), "JPEG", quality=85)),
    ),
    # Decompression bombs (headers claiming more than decode.max_pixels = 50 million pixels).
    (
        "bomb-png-header-200000x200000.png",
        "image_too_large",
        lambda: png(200_000, 200_000, b"\x00" * 10, bit_depth=8, color_type=0),
    ),
    ("bomb-png-8000x8000-zeros.png", "image_too_large", lambda: png_zeros_bomb(8000)),
    ("bomb-jpeg-sof-65000x65000.jpg", "image_too_large", lambda: sof_size(jpeg(), 65_000, 65_000)),
    (
        "bomb-tiff-100000x100000.tif",
        "image_too_large",
        lambda: tiff_value(tiff_value(tiff(), 256, 100_000), 257, 100_000),
    ),
    # Not an image at all.
    ("empty.jpg", "invalid_image", lambda: b""),
    ("text.jpg", "invalid_image", lambda: b"hello, I am a text file, not a JPEG\n" * 8),
    ("random-bytes.png", "invalid_image", lambda: np.random.default_rng(SEED).bytes(2048)),
    ("zero-width.png", "invalid_image", lambda: png(0, 1, b"\x00\x00", bit_depth=8, color_type=0)),
    # Well-formed images of formats that are not accepted.
    ("odd-gif.gif", "unsupported_image", odd("GIF")),
    ("odd-ppm.ppm", "unsupported_image", odd("PPM")),
    ("odd-ico.ico", "unsupported_image", odd("ICO")),
    ("odd-tga.tga", "unsupported_image", odd("TGA")),
    ("odd-pcx.pcx", "unsupported_image", odd("PCX")),
    ("odd-sgi.sgi", "unsupported_image", odd("SGI")),
    ("odd-qoi.qoi", "unsupported_image", odd("QOI")),
    ("odd-im.im", "unsupported_image", odd("IM")),
    ("odd-dds.dds", "unsupported_image", odd("DDS")),
    ("odd-jpeg2000.jp2", "unsupported_image", odd("JPEG2000")),
    ("odd-psd.psd", "unsupported_image", psd_header),
    ("odd-gif-named-jpg.jpg", "unsupported_image", odd("GIF")),
    # SPIDER has no magic number, so it cannot be named without running its parser: it is just not an image.
    ("odd-spider.spi", "invalid_image", odd("SPIDER", "L")),
]


def main(out: Path = HERE) -> None:
    """Write every corpus file and `manifest.csv` (file, expected reason) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, reason, make in CORPUS:
        (out / name).write_bytes(make())
        rows.append((name, reason))
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "expected_reason"])
        writer.writerows(rows)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
