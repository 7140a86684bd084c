"""Shared fixtures: the real OCT sample and one CPU engine per test session."""

from __future__ import annotations

import os

import torch  # importing torch does not import triton

# Triton reads TRITON_INTERPRET when it is first imported, and importing `service` imports the kernels:
# without a GPU, the kernel tests run the Triton code through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# Most tests compare embeddings across batches, processes and servers to 1e-5: they run the float32 torch path
# (and so do the servers and CLI runs they start, which inherit the environment). The runtime tests
# (tests/unit/embedding/test_runtimes.py) check OpenVINO, ONNX Runtime and bf16 against it explicitly.
os.environ.setdefault("EMBEDSERVE_BACKBONE_RUNTIME", "torch")
os.environ.setdefault("EMBEDSERVE_BACKBONE_CPU_PRECISION", "float32")

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import Config, load_config
from service.embedding.engine import Engine

OCT_DIR = Path(__file__).parent / "data" / "oct-sample"
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")


@pytest.fixture(scope="session")
def oct_dir() -> Path:
    return OCT_DIR


@pytest.fixture(scope="session")
def oct_files() -> list[Path]:
    files = sorted(OCT_DIR.rglob("*.jpeg"))
    assert len(files) == 32, "the bundled OCT sample should have 32 scans"
    return files


@pytest.fixture(scope="session")
def oct_labels(oct_files: list[Path]) -> list[str]:
    return [f.parent.name for f in oct_files]


def cpu_config(**overrides: object) -> Config:
    """A CPU config with small batches; keyword names are dotted settings with `__` for the dot."""
    values = {
        "backbone.device": "cpu",
        "backbone.runtime": os.environ["EMBEDSERVE_BACKBONE_RUNTIME"],
        "backbone.cpu_precision": os.environ["EMBEDSERVE_BACKBONE_CPU_PRECISION"],
        "engine.batch_size": 16,
    }
    values |= {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config(env={}, overrides=values)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The default CPU engine (Lite0, Pillow decode), shared by the session."""
    eng = Engine.from_config(cpu_config())
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def oct_embeddings(engine: Engine, oct_files: list[Path]) -> np.ndarray:
    outcomes = engine.embed([f.read_bytes() for f in oct_files])
    assert all(o.ok for o in outcomes)
    return np.stack([o.vector for o in outcomes if o.vector is not None])


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()
