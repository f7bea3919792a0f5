"""The one place that turns `base.device` into a torch device."""

from __future__ import annotations

import torch

from ddm_ops.config import ParamsError


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda / cuda:N must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(f"base.device = {spec!r}: CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParamsError(f"base.device = {spec!r}: only {torch.cuda.device_count()} CUDA devices")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so a wall-clock timing on CUDA measures the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
