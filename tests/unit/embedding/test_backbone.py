"""The bundled backbones are the real ImageNet models; TorchScript export and loading round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from kernels.preprocess import preprocess_batch
from service.embedding.backbone import Backbone, create_backbone, export_torchscript
from service.embedding.engine import Engine
from service.errors import ModelError
from tests.conftest import cpu_config

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _top5(model: torch.nn.Module, image: np.ndarray, size: int) -> set[int]:
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    batch = preprocess_batch([chw], (size, size))
    with torch.inference_mode():
        logits = model(batch)
    return set(logits.topk(5).indices[0].tolist())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_imagenet_head_recognises_real_photographs(name: str) -> None:
    # A wrong block order or padding loads without error but fails these two photographs.
    model, spec = create_backbone(name, with_head=True)
    assert _top5(model, skimage.data.chelsea(), spec.input_size) & CAT_CLASSES
    assert _top5(model, skimage.data.coffee(), spec.input_size) & COFFEE_CLASSES


def test_lite0_spec() -> None:
    model, spec = create_backbone("efficientnet_lite0")
    assert (spec.input_size, spec.embedding_dim) == (224, 1280)
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 1280)


def test_unknown_backbone_says_what_exists() -> None:
    with pytest.raises(ModelError, match="efficientnet_lite0"):
        create_backbone("resnet9000")


def test_missing_torchscript_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        create_backbone(f"torchscript:{tmp_path / 'nope.ts'}")


def test_exported_torchscript_matches_eager(tmp_path: Path) -> None:
    out = tmp_path / "lite0.ts"
    spec = export_torchscript("efficientnet_lite0", out)
    eager = Backbone.create("efficientnet_lite0", device="cpu", optimize="none")
    scripted = Backbone.create(f"torchscript:{out}", device="cpu", optimize="none")
    assert scripted.spec.input_size == spec.input_size == 224
    assert scripted.spec.embedding_dim == 1280
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scripted.forward(x), eager.forward(x), atol=1e-4, rtol=1e-4)


def test_frozen_model_matches_eager() -> None:
    eager = Backbone.create("efficientnet_lite0", device="cpu", optimize="none")
    frozen = Backbone.create("efficientnet_lite0", device="cpu", optimize="freeze")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(frozen.forward(x), eager.forward(x), atol=1e-4, rtol=1e-4)


def test_user_torchscript_resnet18_embeds_through_the_engine(tmp_path: Path, oct_files: list[Path]) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.ts"
    torch.jit.script(resnet).save(str(path))
    engine = Engine.from_config(cpu_config(backbone__model=f"torchscript:{path}"))
    try:
        assert engine.info.embedding_dim == 1000 and engine.info.input_size == 224
        outcomes = engine.embed([f.read_bytes() for f in oct_files[:3]])
        vectors = np.stack([o.vector for o in outcomes if o.vector is not None])
        assert vectors.shape == (3, 1000)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        # Independent reference: the same model run by hand on the same preprocessed batch.
        prepared = engine.prepare([f.read_bytes() for f in oct_files[:3]])
        assert prepared.batch is not None
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(resnet(prepared.batch), dim=1).numpy()
        np.testing.assert_allclose(vectors, ref, atol=1e-4)
    finally:
        engine.close()
