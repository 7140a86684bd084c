"""What every backbone runtime shares: the `Runtime` interface, the compiled-model cache and the torch helpers.

A runtime takes an eval-mode torch module (a registered backbone or a user's TorchScript model) and runs it:
`torch` in process, `openvino` and `onnxruntime` after converting it in process. Only `forward` is called
per batch; it takes a normalised (N, 3, H, W) float batch and returns (N, D) float32 features.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from service.errors import ModelError

if TYPE_CHECKING:
    from service.embedding.backbone import BackboneSpec

logger = logging.getLogger(__name__)

Precision = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RuntimeOptions:
    """How a runtime should run the model; built by `Backbone.create` from the config."""

    device: torch.device
    """Where the forward pass runs; the CPU runtimes refuse anything but the CPU."""
    precision: Precision
    """Compute precision: float32, or bfloat16 / float16 (autocast on CUDA, bf16 kernels on the CPU)."""
    threads: int
    """CPU threads the forward pass may use (its share of the thread budget)."""
    streams: int
    """Inference streams (OpenVINO), each with its own in-flight request; 1 elsewhere."""
    cache_dir: Path | None
    """Root of the compiled-model cache; None converts on every start."""
    channels_last: bool = True
    """Feed channels_last tensors to the torch runtime where it helps (CUDA, bf16 on the CPU)."""
    optimize: str = "auto"
    """torch runtime only: `auto`, `none`, `freeze` or `compile` (see `BackboneConfig.optimize`)."""


class Runtime(abc.ABC):
    """A model ready to turn preprocessed batches into raw (unnormalised) features."""

    name: ClassVar[str]
    """The registry name: `torch`, `openvino`, `onnxruntime`."""

    def __init__(self, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions) -> None:
        self.spec = spec
        self.options = options
        self.device = options.device
        self.precision: str = options.precision

    @abc.abstractmethod
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) float32 features (not yet L2-normalised)."""

    def close(self) -> None:
        """Release what the runtime holds (compiled models, requests); `forward` must not be called after."""
        return  # the torch runtime holds nothing that the garbage collector cannot free safely

    def describe(self) -> dict[str, object]:
        """What to log and report about this runtime (name, precision, threads, streams, version)."""
        return {
            "runtime": self.name,
            "precision": self.precision,
            "threads": self.options.threads,
            "streams": self.options.streams,
        }


def check_cpu(name: str, options: RuntimeOptions) -> None:
    """The CPU runtimes run on the CPU only: say what to use on a GPU."""
    if options.device.type != "cpu":
        raise ModelError(
            f"backbone.runtime={name} runs on the CPU, not {options.device}; use runtime=torch (or auto) on CUDA"
        )


def pool_features(out: torch.Tensor) -> torch.Tensor:
    """Turn a model output into (N, D): feature maps are average-pooled, vectors kept."""
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 2:
        return out
    raise ModelError(f"the model returned shape {tuple(out.shape)}; expected (N, D) or (N, C, H, W)")


# --------------------------------------------------------------------------------------------------
# Compiled-model cache


def weights_digest(module: nn.Module) -> str:
    """A content hash of the module's class, parameter names, shapes and bytes (tens of ms for Lite0)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for key, value in module.state_dict().items():
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ModelCache:
    """Converted models under `root/<runtime>/<model>-<size>-<precision>-<key>/`, written atomically.

    The key hashes the model name, its weights, the input size, the precision and the runtime's version, so a
    new model, new weights or a runtime upgrade converts again and a restart does not.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, runtime: str, version: str, spec: BackboneSpec, precision: str, digest: str) -> Path:
        """The directory of one converted model (it may not exist yet)."""
        key = hashlib.sha256(f"{spec.name}|{spec.input_size}|{precision}|{version}|{digest}".encode()).hexdigest()
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name.removeprefix("torchscript:"))[:60]
        return self.root / runtime / f"{stem}-{spec.input_size}-{precision}-{key[:16]}"

    @staticmethod
    def publish(entry: Path, write: Callable[[Path], None]) -> None:
        """Write an entry into a temporary sibling through `write(dir)`, then rename it into place."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", suffix=".tmp", dir=entry.parent))
        try:
            write(tmp)
            try:
                tmp.rename(entry)
            except OSError:
                if not entry.is_dir():  # another process published the same entry first: theirs is as good
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# torch helpers (TorchScript is deprecated in torch >= 2.10; it stays the portable format of this project)


@contextlib.contextmanager
def jit_quietly() -> Iterator[None]:
    """Silence torch's TorchScript deprecation and tracer warnings for the duration."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """`torch.jit.script`, quietly."""
    with jit_quietly():
        return torch.jit.script(module)


def optimized(module: nn.Module, optimize: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module as `optimize` asks: `none` (eager), `freeze` (scripted and frozen), `compile`."""
    if optimize == "none":
        return module
    if optimize == "freeze":
        scripted = module if isinstance(module, torch.jit.ScriptModule) else script(module)
        try:
            with jit_quietly():
                return torch.jit.freeze(scripted.eval())
        except RuntimeError as e:
            logger.warning("could not freeze the model (%s); running it unfrozen", e)
            return scripted
    if optimize == "compile":
        return torch.compile(module)
    raise ModelError(f"unknown optimize mode {optimize!r}; use auto, none, freeze or compile")
