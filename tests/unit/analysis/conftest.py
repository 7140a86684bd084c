"""Real images for the analysis tests: scikit-image's bundled photos (the unwanted / odd set next to the OCT scans)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.embedding.engine import Engine


def bundled_photos() -> list[Path]:
    """Every 2-D image file scikit-image ships in `skimage/data` (photos, a page, text, textures, a retina, ...)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.fixture(scope="session")
def photo_files() -> list[Path]:
    files = bundled_photos()
    assert len(files) >= 20, f"scikit-image should bundle at least 20 images, found {len(files)}"
    return files


@pytest.fixture(scope="session")
def photo_embeddings(engine: Engine, photo_files: list[Path]) -> np.ndarray:
    outcomes = engine.embed([f.read_bytes() for f in photo_files])
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    return np.stack([o.vector for o in outcomes if o.vector is not None])
