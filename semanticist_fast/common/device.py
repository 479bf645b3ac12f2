"""One place that turns a device name into a device and picks the autocast that goes with it."""
import contextlib
from typing import Optional

import torch


def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """"auto" (or None): the GPU when there is one, else the CPU; any other name as torch reads it."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, bf16: bool = True):
    """bf16 autocast on a GPU; full precision elsewhere (CPU bf16 is slow and changes the numbers)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
