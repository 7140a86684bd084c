"""The ONNX Runtime runtime: the torch module exported to ONNX in process, float32 on the CPU provider."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from service.embedding.runtimes import register_runtime
from service.embedding.runtimes.base import (
    ModelCache,
    Runtime,
    RuntimeOptions,
    check_cpu,
    jit_quietly,
    pool_features,
    weights_digest,
)
from service.errors import ModelError
from service.files import write_atomic

if TYPE_CHECKING:
    from service.embedding.backbone import BackboneSpec

logger = logging.getLogger(__name__)

_OPSET = 17


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider, `threads` intra-op threads, sequential execution."""

    name = "onnxruntime"

    def __init__(self, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions) -> None:
        super().__init__(module, spec, options)
        check_cpu(self.name, options)
        if options.precision != "float32":
            raise ModelError(f"runtime=onnxruntime runs float32 on the CPU, not {options.precision}")
        import onnxruntime as ort

        self.version = ort.__version__
        self.cache_entry: Path | None = None
        model = self._model(module, spec, options)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ort raises its own Fail/InvalidGraph types
            raise ModelError(f"ONNX Runtime could not load {spec.name}: {str(e).strip()[:200]}") from e
        self._input = self.session.get_inputs()[0].name

    def _model(self, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions) -> Any:
        if options.cache_dir is None:
            return _export(module, spec)
        entry = ModelCache(options.cache_dir).entry(
            self.name, f"{self.version}-opset{_OPSET}", spec, options.precision, weights_digest(module)
        )
        self.cache_entry = entry
        path = entry / "model.onnx"
        if path.is_file():
            logger.info("onnxruntime: %s from the cache %s", spec.name, entry)
            return str(path)
        data = _export(module, spec)

        def write(handle: IO[Any]) -> None:
            handle.write(data)

        ModelCache.publish(entry, lambda d: write_atomic(d / "model.onnx", write))
        logger.info("onnxruntime: exported %s, cached in %s", spec.name, entry)
        return str(path)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run(None, {self._input: x})[:1]
        return pool_features(torch.from_numpy(np.asarray(out, dtype=np.float32)))

    def describe(self) -> dict[str, object]:
        return super().describe() | {"version": self.version}


def _export(module: nn.Module, spec: BackboneSpec) -> bytes:
    """torch module or ScriptModule -> ONNX bytes with a dynamic batch dimension (the TorchScript exporter,
    which takes ScriptModules as they are)."""
    size = spec.input_size
    buf = io.BytesIO()
    try:
        with jit_quietly(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices are not the user's
            torch.onnx.export(
                module.to("cpu").eval(),
                (torch.zeros(1, 3, size, size),),
                buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                dynamo=False,
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "n"}, "features": {0: "n"}},
                opset_version=_OPSET,
            )
    except Exception as e:  # the exporter raises many types; each means "this model does not export"
        raise ModelError(
            f"could not export {spec.name} to ONNX ({type(e).__name__}: {str(e).strip()[:200]}); "
            "use backbone.runtime=openvino or torch"
        ) from e
    return buf.getvalue()
