"""Which accelerator this process can use: the one place that asks torch (or NVML) about the GPU.

- `cuda_available`, `resolve_device`: the device a config names;
- `ThreadStreams`: one CUDA stream per calling thread, so decode and the forward pass overlap on the GPU;
- `cuda_memory_probe`, `cuda_device_memory_probe`, `nvml_utilization_probe`: what the metrics gauges read
  (`service.metrics` declares the gauges and stays torch-free; the server hands it these probes).

Imports torch lazily, so a torch-free caller (the client, the CLI's remote mode) can import this module and
`cuda_available()` answers False where torch is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from service.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def is_device_name(value: str) -> bool:
    """True for the device names a config accepts: auto, cpu, cuda, cuda:N (checked without importing torch)."""
    return _DEVICE.fullmatch(value) is not None


def resolve_device(device: str | None, *, what: str = "device") -> torch.device:
    """`auto` (or None) -> the current CUDA device when available, else cpu; `cuda` / `cuda:N` are checked.

    `cuda` means torch's current CUDA device (an index is filled in, so callers never assume device 0); `cuda:N`
    must name a visible GPU. `what` names the setting in the error message.
    """
    import torch

    name = device or "auto"
    if not is_device_name(name):
        raise ConfigError(f"unknown {what} {device!r}; use auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        if name == "auto":
            return torch.device("cpu")
        raise ConfigError(f"{what}={name} was asked for but no CUDA GPU is available; use {what}=cpu or auto")
    if name in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index = int(name.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{what}={name} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


class ThreadStreams:
    """One CUDA stream per calling thread on `device`, created on first use; every method is a no-op on the CPU.

    Work that different threads queue on the default stream runs one after the other on the GPU; on their own
    streams, the decode and preprocess of the next batch (prepare workers) overlap the forward pass of this one
    (its owner thread). The hand-over between them:

    - the producer ends with `finish(stream)`: an event recorded on its stream and waited for by that thread alone,
      so the tensors it returns are complete and any thread, on any stream, may read them;
    - the consumer starts with `adopt(tensor, stream)`: its stream waits (on the GPU, the host does not block) for
      whatever is queued on the default stream, where code outside these threads (say, a selection of rows of a
      prepared batch) may have produced `tensor`, and the caching allocator learns that `stream` uses `tensor`, so
      its memory is not handed out again while queued kernels still read it.

    `cuda` is the `torch.cuda` module (a stand-in in tests).
    """

    def __init__(self, device: torch.device, *, cuda: Any = None) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._cuda = cuda
        self._local = threading.local()
        self._lock = threading.Lock()
        self.created = 0
        """Streams created so far (one per thread that used this object)."""

    def _module(self) -> Any:
        if self._cuda is None:
            import torch

            self._cuda = torch.cuda
        return self._cuda

    def stream(self) -> Any:
        """This thread's stream (None on the CPU)."""
        if not self.enabled:
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._module().Stream(device=self.device)
            self._local.stream = stream
            with self._lock:
                self.created += 1
        return stream

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        """Make this thread's stream the current one for the block; yields it (None on the CPU)."""
        stream = self.stream()
        if stream is None:
            yield None
            return
        with self._module().stream(stream):
            yield stream

    def finish(self, stream: Any) -> None:
        """Block this thread until the work queued on `stream` so far is done (an event: no device-wide sync)."""
        if stream is None:
            return
        event = self._module().Event()
        event.record(stream)
        event.synchronize()

    def adopt(self, tensor: torch.Tensor | None, stream: Any) -> None:
        """Before `stream` reads `tensor`: wait for the default stream's queued work, and mark `tensor` in use."""
        if stream is None:
            return
        stream.wait_stream(self._module().default_stream(self.device))
        if tensor is not None and tensor.is_cuda:
            tensor.record_stream(stream)


# -- metric probes (the gauges are declared in service.metrics) ------------------------------------------------------


def cuda_memory_probe(device: str) -> Callable[[], tuple[int, int]]:
    """(allocated, reserved) bytes of torch's CUDA caching allocator on `device` (torch imported on first use)."""
    import torch

    def probe() -> tuple[int, int]:
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)

    return probe


def cuda_device_memory_probe(device: str) -> Callable[[], tuple[int, int]]:
    """(free, total) bytes of `device` from `torch.cuda.mem_get_info` (the driver's count, all processes)."""
    import torch

    def probe() -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    return probe


def nvml_utilization_probe(device: str) -> Callable[[], float] | None:
    """A probe of the GPU's busy fraction through NVML (`nvidia-ml-py`), or None where NVML is absent or fails."""
    try:
        import pynvml
    except ImportError:
        return None
    index = int(device.partition(":")[2] or 0)
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetUtilizationRates(handle)
    except Exception as e:  # NVML raises its own NVMLError family; any failure means no utilisation metric
        logger.info("no GPU utilisation metric: NVML failed (%s)", e)
        return None

    def probe() -> float:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0

    return probe
