"""Which accelerator this process can use: the one place that asks torch about CUDA.

Imports torch lazily, so a torch-free caller (the client, the CLI's remote mode) can import this module and
`cuda_available()` answers False where torch is not installed.
"""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING

from service.errors import ConfigError

if TYPE_CHECKING:
    import torch

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
