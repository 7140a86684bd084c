"""Backbone runtimes, looked up by name: `torch`, `openvino`, `onnxruntime` (a TensorRT one would register here too).

`backbone.runtime = auto` picks OpenVINO on an x86 CPU and torch on CUDA (and on CPUs OpenVINO does not serve);
`backbone.cpu_precision = auto` picks bfloat16 where the CPU has AMX or AVX512-BF16, float32 otherwise.
`plan_threads` splits one CPU thread budget between decode workers and inference (how depends on the runtime).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from service.embedding.runtimes.base import ModelCache, Runtime, RuntimeOptions
from service.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from service.embedding.backbone import BackboneSpec

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[nn.Module, "BackboneSpec", RuntimeOptions], Runtime]
_RUNTIMES: dict[str, RuntimeFactory] = {}
FactoryT = TypeVar("FactoryT", bound=RuntimeFactory)

__all__ = [
    "ModelCache",
    "Runtime",
    "RuntimeOptions",
    "ThreadPlan",
    "available_runtimes",
    "cpu_has_bf16",
    "create_runtime",
    "plan_threads",
    "register_runtime",
    "resolve_precision",
    "resolve_runtime",
]


def register_runtime(name: str) -> Callable[[FactoryT], FactoryT]:
    """Register a factory `(module, spec, options) -> Runtime` (a `Runtime` subclass) under `name`."""

    def decorator(factory: FactoryT) -> FactoryT:
        if name in _RUNTIMES:
            raise ValueError(f"runtime {name!r} is already registered")
        _RUNTIMES[name] = factory
        return factory

    return decorator


def available_runtimes() -> list[str]:
    """Registered runtime names (besides `auto`)."""
    return sorted(_RUNTIMES)


def create_runtime(name: str, module: nn.Module, spec: BackboneSpec, options: RuntimeOptions) -> Runtime:
    """Build the runtime `name` (not `auto`: see `resolve_runtime`) around an eval-mode module."""
    try:
        factory = _RUNTIMES[name]
    except KeyError:
        raise ModelError(
            f"unknown backbone runtime {name!r}; use auto or one of {', '.join(available_runtimes())}"
        ) from None
    return factory(module, spec, options)


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def resolve_runtime(name: str, device: torch.device) -> str:
    """`auto` -> `torch` on CUDA, `openvino` on an x86 CPU, `torch` elsewhere; other names pass through."""
    if name != "auto":
        return name
    return "openvino" if device.type == "cpu" and _is_x86() else "torch"


@cache
def cpu_has_bf16() -> bool:
    """True when the CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(cpu_precision: str, runtime: str, device: torch.device, amp_dtype: str) -> str:
    """The precision to run: on CUDA the autocast dtype; on the CPU `cpu_precision`, with `auto` = bf16 where fast."""
    if device.type == "cuda":
        return amp_dtype
    if cpu_precision == "auto":
        if runtime == "onnxruntime":
            return "float32"  # ONNX Runtime's CPU provider has no bf16 convolutions
        return "bfloat16" if cpu_has_bf16() else "float32"
    if cpu_precision == "bfloat16" and runtime == "onnxruntime":
        raise ConfigError(
            "backbone.cpu_precision=bfloat16 is not available with runtime=onnxruntime (no bf16 kernels on the CPU); "
            "use runtime=openvino or torch, or cpu_precision=float32"
        )
    return cpu_precision


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """How one CPU thread budget is split."""

    budget: int
    """Cores shared by decode and inference."""
    decode_workers: int
    """Threads decoding JPEGs in parallel with inference."""
    inference_threads: int
    """Threads of the forward pass (torch intra-op, OpenVINO, ONNX Runtime); 0 on CUDA."""
    streams: int
    """OpenVINO streams, each with one request in flight; 1 for the other runtimes."""


def plan_threads(
    *, budget: int, decode_workers: int, inference_threads: int, streams: int, runtime: str, device: torch.device
) -> ThreadPlan:
    """Split `budget` cores (0 = all available) between decode workers and inference.

    Zeros mean automatic. On CUDA every core decodes. On the CPU a quarter of the budget decodes (at least one
    thread) and how the rest is shared depends on the runtime:
    - OpenVINO's threads sleep while a request waits for its input, so the decode workers run beside them: inference
      takes every core of the budget and decoding fills the gaps between its requests (on 2 cores, 1 decode worker
      beside 2 single-thread streams embeds 194 images/s where 1 + 1 threads embed 149, with `sys` time 15 % of
      the CPU time; docs/benchmarks.md). Each count is at most the budget.
    - torch's and ONNX Runtime's threads spin between operators, so decode workers + inference threads <= cores;
      decode workers that take every core leave inference one thread, with a warning.
    Explicit counts beyond those limits are a `ConfigError`.
    """
    cores = budget or available_cores()
    if device.type == "cuda":
        return ThreadPlan(cores, decode_workers or cores, 0, 1)
    if cores < 2:
        logger.warning("a thread budget of %d core cannot be split: decode and inference get one thread each", cores)
        return ThreadPlan(cores, decode_workers or 1, inference_threads or 1, streams or 1)
    if runtime == "openvino":
        for name, count in (("decode.workers", decode_workers), ("backbone.threads", inference_threads)):
            if count > cores:
                raise ConfigError(
                    f"{name}={count} is more than the {cores} cores of engine.cpu_threads; lower it or raise "
                    "engine.cpu_threads"
                )
        decode_workers = decode_workers or max(1, round(cores / 4))
        inference_threads = inference_threads or cores
        # One stream per two threads, but at least two streams: two single-thread requests keep two cores busier
        # than one two-thread request (measured on 2 cores: 194 against 147 images/s end to end).
        streams = streams or max(min(2, inference_threads), inference_threads // 2)
    else:
        if decode_workers and inference_threads and decode_workers + inference_threads > cores:
            raise ConfigError(
                f"decode.workers={decode_workers} + backbone.threads={inference_threads} is more than the "
                f"{cores} cores of engine.cpu_threads; lower one of them or raise engine.cpu_threads"
            )
        if not decode_workers:
            decode_workers = max(1, cores - inference_threads) if inference_threads else max(1, round(cores / 4))
        if not inference_threads:
            inference_threads = cores - decode_workers
            if inference_threads < 1:
                logger.warning(
                    "decode.workers=%d leaves no core of the %d of engine.cpu_threads for inference; it gets one "
                    "thread anyway (oversubscribed): lower decode.workers",
                    decode_workers,
                    cores,
                )
                inference_threads = 1
        streams = 1
    if streams > inference_threads:
        raise ConfigError(
            f"backbone.streams={streams} is more than backbone.threads={inference_threads}; each stream needs a thread"
        )
    return ThreadPlan(cores, decode_workers, inference_threads, streams)


def cache_root(data_dir: str | os.PathLike[str]) -> Path:
    """Where converted models live under the data directory."""
    return Path(data_dir) / "model-cache"


# Fill the registry: each module registers the runtime it defines (their heavy imports happen on first use).
from service.embedding.runtimes import onnxruntime_rt, openvino_rt, torch_rt  # noqa: E402

del onnxruntime_rt, openvino_rt, torch_rt
