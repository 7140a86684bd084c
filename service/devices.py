"""Which accelerator this process can use: the one place that asks torch about CUDA.

Imports torch lazily, so a torch-free caller (the client, the CLI's remote mode) can import this module and
`cuda_available()` answers False where torch is not installed.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from service.errors import ConfigError

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or None) -> cuda when available, else cpu; `cuda` without a GPU is an error that says so."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if cuda_available() else "cpu")
    if device == "cuda" and not cuda_available():
        raise ConfigError("device=cuda was asked for but no CUDA GPU is available; use device=cpu or auto")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
