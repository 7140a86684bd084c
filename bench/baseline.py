"""The baseline every stage is compared with: the notebook pipeline, written well.

A torch DataLoader with Pillow workers (one per core), pinned memory on a GPU, Pillow decode and
resize, ImageNet normalisation, the same EfficientNet-Lite weights run eagerly (autocast on a GPU),
L2-normalised on the host. Clustering baselines are scikit-learn's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from service.embedding.backbone import IMAGENET_MEAN, IMAGENET_STD, create_backbone


class _Files(Dataset[torch.Tensor]):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            rgb = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


@dataclass(slots=True)
class BaselineResult:
    """Throughput of the baseline over a list of files."""

    images: int
    seconds: float
    workers: int
    vectors: np.ndarray

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def run_baseline(
    paths: Sequence[Path], *, model: str = "efficientnet_lite0", batch_size: int = 64, device: str = "cpu"
) -> BaselineResult:
    """Embed `paths` the baseline way; the model is built before the clock starts."""
    module, spec = create_backbone(model)
    dev = torch.device(device)
    module = module.to(dev).eval()
    workers = os.cpu_count() or 1
    loader = DataLoader(
        _Files(paths, spec.input_size),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    parts: list[np.ndarray] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for cpu_batch in loader:
            batch = cpu_batch.to(dev, non_blocking=True)
            if dev.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = module(batch)
            else:
                out = module(batch)
            parts.append(torch.nn.functional.normalize(out.float(), dim=1).cpu().numpy())
    seconds = time.perf_counter() - start
    vectors = np.concatenate(parts) if parts else np.empty((0, spec.embedding_dim), np.float32)
    return BaselineResult(images=len(paths), seconds=seconds, workers=workers, vectors=vectors)
