"""The torch runtime: CUDA with autocast (fp16/bf16) and channels_last; on the CPU frozen TorchScript in float32,
or eager bf16 autocast + channels_last where the CPU has bf16 instructions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.embedding.runtimes import register_runtime
from service.embedding.runtimes.base import Runtime, RuntimeOptions, optimized, pool_features

if TYPE_CHECKING:
    from service.embedding.backbone import BackboneSpec

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@register_runtime("torch")
class TorchRuntime(Runtime):
    """The model in process; the only runtime on CUDA."""

    name = "torch"

    def __init__(self, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions) -> None:
        super().__init__(module, spec, options)
        device = options.device
        self.amp_dtype: torch.dtype | None = _DTYPES.get(options.precision)
        self.channels_last = options.channels_last and (device.type == "cuda" or self.amp_dtype is not None)
        module = module.to(device).eval()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        optimize = options.optimize
        if optimize == "auto":
            # Frozen TorchScript is the fastest float32 CPU path; autocast needs the eager module.
            optimize = "freeze" if device.type == "cpu" and self.amp_dtype is None else "none"
        self.optimize = optimize
        self.module: Callable[[torch.Tensor], torch.Tensor] = optimized(module, optimize)
        if device.type == "cpu" and options.threads:
            torch.set_num_threads(options.threads)  # process-wide: torch's share of the one thread budget

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                    out = self.module(batch)
            else:
                out = self.module(batch)
            return pool_features(out).float()

    def describe(self) -> dict[str, object]:
        return super().describe() | {"optimize": self.optimize, "version": torch.__version__}
