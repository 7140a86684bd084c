"""The OpenVINO runtime: the torch module converted in process, bf16 on CPUs with AMX / AVX512-BF16,
several streams with one asynchronous request each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from service.embedding.backbone import BackboneSpec

logger = logging.getLogger(__name__)

_HINTS = {"float32": "f32", "bfloat16": "bf16"}


@register_runtime("openvino")
class OpenVinoRuntime(Runtime):
    """OpenVINO on the CPU. A batch is split across the streams and their requests run at once; `forward`
    waits for them with the GIL released, so decode threads keep working meanwhile."""

    name = "openvino"

    def __init__(self, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions) -> None:
        super().__init__(module, spec, options)
        check_cpu(self.name, options)
        if options.precision not in _HINTS:
            raise ModelError(f"runtime=openvino runs float32 or bfloat16, not {options.precision}")
        import openvino as ov

        self.version = ov.get_version()
        core = ov.Core()
        model, self.cache_entry = self._model(ov, core, module, spec, options)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[options.precision],
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": str(options.streams),
            "INFERENCE_NUM_THREADS": str(options.threads),
        }
        if self.cache_entry is not None:
            config["CACHE_DIR"] = str(self.cache_entry / "compiled")
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise ModelError(f"OpenVINO could not compile {spec.name}: {str(e).strip().splitlines()[0]}") from e
        # Where the CPU lacks bf16, OpenVINO quietly runs f32: report what it does, not what was asked.
        actual = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = "bfloat16" if "bf16" in actual or "bfloat16" in actual else "float32"
        self._requests = [self.compiled.create_infer_request() for _ in range(options.streams)]

    def _model(
        self, ov: Any, core: Any, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions
    ) -> tuple[Any, Path | None]:
        if options.cache_dir is None:
            return _convert(ov, module, spec), None
        entry = ModelCache(options.cache_dir).entry(
            self.name, self.version, spec, options.precision, weights_digest(module)
        )
        xml = entry / "model.xml"
        if xml.is_file():
            logger.info("openvino: %s from the cache %s", spec.name, entry)
            return core.read_model(str(xml)), entry
        model = _convert(ov, module, spec)
        # compress_to_fp16 would round the weights: the cache must hold the model as converted.
        ModelCache.publish(entry, lambda d: ov.save_model(model, str(d / "model.xml"), compress_to_fp16=False))
        logger.info("openvino: converted %s, cached in %s", spec.name, entry)
        return core.read_model(str(xml)), entry

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        parts = [p for p in np.array_split(x, min(len(self._requests), max(1, x.shape[0]))) if p.shape[0]]
        requests = self._requests[: len(parts)]
        for request, part in zip(requests, parts, strict=True):
            request.start_async({0: part}, share_inputs=True)
        outputs = []
        for request in requests:
            request.wait()
            outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        out = torch.from_numpy(np.concatenate(outputs) if len(outputs) > 1 else outputs[0])
        return pool_features(out)

    def describe(self) -> dict[str, object]:
        return super().describe() | {"version": self.version, "cache": str(self.cache_entry or "")}

    def close(self) -> None:
        # Release the requests and the compiled model on the caller's thread: left to the garbage collector,
        # they were freed on whichever thread collected them, and that has crashed the process (SIGSEGV).
        self._requests.clear()
        self.compiled = None


def _convert(ov: Any, module: nn.Module, spec: BackboneSpec) -> Any:
    """torch module or ScriptModule -> ov.Model with a dynamic batch dimension."""
    size = spec.input_size
    example = torch.zeros(1, 3, size, size)
    try:
        with jit_quietly(), torch.no_grad():
            return ov.convert_model(module.to("cpu").eval(), example_input=example, input=[(-1, 3, size, size)])
    except Exception as e:  # the converter raises many types; each means "this model does not convert"
        raise ModelError(
            f"OpenVINO could not convert {spec.name} ({type(e).__name__}: {str(e).strip()[:200]}); "
            "use backbone.runtime=torch"
        ) from e
