"""Accepted formats: the config field, Pillow's registry, plugin loading, and naming refused formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import DEFAULT_FORMATS, PILLOW_READ_FORMATS, DecodeConfig, load_config
from service.embedding.formats import JpegFrame, jpeg_frame, plugin_module, sniff_format
from service.errors import ConfigError
from tests.unit.embedding.bad_corpus import BAD_DIR

ROOT = Path(__file__).resolve().parents[3]


def _pillow_registry() -> dict[str, str]:
    """Format -> module of its reader, with every Pillow plugin loaded (in a fresh interpreter)."""
    code = (
        "import json; from PIL import Image; Image.init(); "
        "print(json.dumps({k: v[0].__module__ for k, v in Image.OPEN.items()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_known_formats_and_plugin_modules_match_pillow() -> None:
    registry = _pillow_registry()
    assert set(registry) == PILLOW_READ_FORMATS, "update PILLOW_READ_FORMATS in service/config.py for this Pillow"
    for fmt, module in registry.items():
        assert plugin_module(fmt) == module, fmt


def test_default_formats_are_the_documented_ones() -> None:
    assert DecodeConfig().formats == ("JPEG", "PNG", "BMP", "TIFF", "WEBP") == DEFAULT_FORMATS


def test_formats_from_toml_env_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[decode]\nformats = ["jpeg", "png"]\n')
    assert load_config(toml, env={}).decode.formats == ("JPEG", "PNG")
    assert load_config(env={"EMBEDSERVE_DECODE_FORMATS": "JPEG, gif"}).decode.formats == ("JPEG", "GIF")
    assert load_config(env={}, overrides={"decode.formats": ["TIFF"]}).decode.formats == ("TIFF",)


def test_bad_formats_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match=r"HEIC, which Pillow cannot read.*such as JPEG, PNG"):
        DecodeConfig(formats=("JPEG", "HEIC"))
    with pytest.raises(ConfigError, match="empty"):
        DecodeConfig(formats=())
    with pytest.raises(ConfigError, match=r"decode\.formats"):
        load_config(env={"EMBEDSERVE_DECODE_FORMATS": "JPEG,NOPE"})


_ISOLATION_CHECK = r"""
import json, sys, torch
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from PIL import Image
from service.config import DecodeConfig
from service.embedding.decode import create_decoder

calls = []
real_init = Image.init
Image.init = lambda: calls.append("init") or real_init()
decoder = create_decoder(DecodeConfig(backend="pillow"), torch.device("cpu"), ThreadPoolExecutor(1), max_batch=4)
files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.name not in ("manifest.csv", "make_corpus.py"))
outs = decoder.decode([p.read_bytes() for p in files], (224, 224), "squash")
plugins = sorted(m for m in sys.modules if m.startswith("PIL.") and m.endswith("ImagePlugin"))
print(json.dumps({"init_calls": len(calls), "plugins": plugins, "decoded": len(outs)}))
"""


def test_decode_loads_only_the_allowed_plugins_and_never_all_of_them() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _ISOLATION_CHECK, str(BAD_DIR)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["decoded"] > 40
    assert report["init_calls"] == 0
    allowed = {plugin_module(f) for f in DEFAULT_FORMATS}
    # Pillow's preinit() (run by every Image.open) imports its five common plugins; GIF's and PPM's are
    # registered that way but never tried, since decode opens with formats=.
    preinit = {plugin_module(f) for f in ("BMP", "GIF", "JPEG", "PPM", "PNG")}
    assert set(report["plugins"]) <= allowed | preinit, report["plugins"]
    assert allowed <= set(report["plugins"])


def test_extra_formats_can_be_allowed(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from service.embedding.decode import create_decoder

    gif = (BAD_DIR / "odd-gif.gif").read_bytes()
    with ThreadPoolExecutor(1) as pool:
        strict = create_decoder(DecodeConfig(backend="pillow"), torch.device("cpu"), pool, max_batch=2)
        relaxed = create_decoder(
            DecodeConfig(backend="pillow", formats=(*DEFAULT_FORMATS, "GIF")), torch.device("cpu"), pool, max_batch=2
        )
        (refused,) = strict.decode([gif], (224, 224), "squash")
        (accepted,) = relaxed.decode([gif], (224, 224), "squash")
    assert getattr(refused, "reason", None) == "unsupported_image"
    assert isinstance(accepted, torch.Tensor) and accepted.shape == (3, 16, 16)


def test_sniffed_names_match_what_pillow_identifies() -> None:
    import io
    import warnings

    from PIL import Image

    for path in sorted(BAD_DIR.glob("odd-*")):
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with Image.open(io.BytesIO(data)) as img:
                pillow_format = img.format
        claimed = sniff_format(data)
        if pillow_format == "SPIDER" or path.name == "odd-psd.psd":
            continue  # SPIDER has no magic number; Pillow writes no PSD, ours is a header only
        assert claimed == pillow_format, path.name


def test_jpeg_frame_reads_the_frame_header() -> None:
    data = (BAD_DIR / "trunc-jpeg-7000x7000-35k.jpg").read_bytes()
    frame = jpeg_frame(data)
    assert frame is not None and (frame.width, frame.height, frame.sof) == (7000, 7000, 0xC0)
    assert frame.min_entropy_bytes() == (875 * 875 + 7) // 8
    assert JpegFrame(sof=0xC9, width=7000, height=7000, scan_start=0).min_entropy_bytes() == 0  # arithmetic coding
    assert jpeg_frame(b"\xff\xd8\xff\xe0\x00") is None
