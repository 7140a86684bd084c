"""`embedserve probe --features raw`: from a Parquet file and from a server's collection (the pixels then come from
the image files: their stored `path`, or `--image-dir`), with clear errors when the images cannot be found."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from service.analysis.evaluate import run_probe
from service.api.clusterer import add_clusterer
from service.cli.main import main
from service.types import FetchedItems
from tests.conftest import OCT_DIR

PATIENT = r"[A-Z]+-(\d+)-"


@dataclass
class Store:
    """The one collection `oct`: the 32 scans' keys, random vectors (the raw probe never uses them), attributes."""

    items: FetchedItems

    def fetch(self, collection: str, keys: Sequence[str] | None = None) -> FetchedItems:
        if not keys:
            return self.items
        rows = [self.items.keys.index(k) for k in keys]
        return FetchedItems(list(keys), self.items.vectors[rows], [self.items.attributes[i] for i in rows])


@dataclass
class FakeServer:
    index: Store


def _oct_items(path_root: Path) -> FetchedItems:
    files = sorted(OCT_DIR.rglob("*.jpeg"))
    keys = [f.relative_to(OCT_DIR).as_posix() for f in files]
    attributes = [
        {"label": k.split("/")[0], "patient": re.search(PATIENT, k).group(1), "path": str(path_root / k)}  # type: ignore[union-attr]
        for k in keys
    ]
    vectors = np.random.default_rng(0).standard_normal((len(keys), 8)).astype(np.float32)
    return FetchedItems(keys, vectors, attributes)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeServer]]:
    """A Clusterer on loopback; each test sets which stored paths its collection has."""
    fake = FakeServer(Store(_oct_items(OCT_DIR)))
    loop = asyncio.new_event_loop()
    holder: dict[str, Any] = {}

    async def start() -> None:
        grpc_server = grpc.aio.server()
        add_clusterer(grpc_server, fake)
        holder["port"] = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        holder["server"] = grpc_server

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield f"127.0.0.1:{holder['port']}", fake
    asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _expected(keys: list[str], *, groups: list[str]) -> float:
    """The probe's accuracy on 64x64 grayscale pixels read here, by the evaluation code called directly."""
    pixels = np.stack(
        [
            np.asarray(
                Image.open(OCT_DIR / k).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float32
            ).ravel()
            / 255.0
            for k in keys
        ]
    )
    return run_probe(pixels, [k.split("/")[0] for k in keys], folds=4, groups=groups, seed=0).accuracy


def _probe(argv: list[str], out: Path) -> dict[str, Any]:
    assert main(["probe", "--features", "raw", "--folds", "4", "--wait", "0", "--json", str(out), *argv]) == 0
    payload: dict[str, Any] = json.loads(out.read_text())
    return payload


def test_raw_probe_through_a_server_reads_the_stored_paths(server: tuple[str, FakeServer], tmp_path: Path) -> None:
    target, fake = server
    fake.index = Store(_oct_items(OCT_DIR))
    keys = fake.index.items.keys
    patients = [a["patient"] for a in fake.index.items.attributes]
    got = _probe(["--server", target, "--collection", "oct", "--group", "patient"], tmp_path / "a.json")
    assert got["grouped_by"] == "patient" and got["folds"] == 4
    assert got["accuracy"] == pytest.approx(_expected(keys, groups=patients), abs=1e-12)
    # The same with the groups taken from the keys, as --parquet does.
    got = _probe(["--server", target, "--collection", "oct", "--group-pattern", PATIENT], tmp_path / "b.json")
    assert got["accuracy"] == pytest.approx(_expected(keys, groups=patients), abs=1e-12)


def test_moved_images_need_image_dir(
    server: tuple[str, FakeServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, fake = server
    fake.index = Store(_oct_items(Path("/embedded/elsewhere")))  # the paths of the machine that ran `embed`
    argv = [
        "probe",
        "--features",
        "raw",
        "--wait",
        "0",
        "--server",
        target,
        "--collection",
        "oct",
        "--group",
        "patient",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read /embedded/elsewhere/" in err and "pass --image-dir DIR" in err
    got = _probe([*argv[5:], "--image-dir", str(OCT_DIR)], tmp_path / "c.json")
    patients = [a["patient"] for a in fake.index.items.attributes]
    assert got["accuracy"] == pytest.approx(_expected(fake.index.items.keys, groups=patients), abs=1e-12)
    assert main([*argv, "--image-dir", str(tmp_path / "nope")]) == 2
    assert "--image-dir" in capsys.readouterr().err
    assert main(["probe", "--wait", "0", "--server", target, "--collection", "oct", "--image-dir", str(OCT_DIR)]) == 2
    assert "add --features raw" in capsys.readouterr().err
