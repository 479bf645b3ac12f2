"""One place that turns a device name into a device and decides the precision that runs on it."""
import contextlib
from typing import Literal, Optional

import torch

# Sampling and evaluation precision (`--precision`): bf16 runs the networks under bf16 autocast (the flash-attn
# kernels take bf16 only) with TF32 for the matmuls autocast leaves in fp32; tf32 keeps fp32 tensors with TF32
# matmuls and convolutions; fp32 is full fp32, TF32 off. On the CPU every choice runs in fp32 (CPU bf16 is slow and
# changes the numbers).
Precision = Literal["bf16", "tf32", "fp32"]
PRECISIONS = ("bf16", "tf32", "fp32")


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


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose bf16 (the default on a GPU), tf32 or fp32")
    return precision


def precision_settings(device: torch.device, precision: str) -> tuple[bool, Optional[str], Optional[bool]]:
    """(bf16 autocast, float32 matmul precision, cuDNN TF32) for `precision` on `device`; None: left as it is."""
    check_precision(precision)
    if device.type != "cuda":
        return False, None, None
    tf32 = precision != "fp32"
    return precision == "bf16", "high" if tf32 else "highest", tf32


def effective_precision(device: torch.device, precision: str) -> str:
    """What `precision` runs as on `device`: itself on a GPU, fp32 on the CPU."""
    return check_precision(precision) if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def inference_precision(device: torch.device, precision: str = "bf16"):
    """Run sampling / evaluation on `device` in `precision` (see PRECISIONS); the TF32 switches are restored after."""
    bf16, matmul, cudnn_tf32 = precision_settings(torch.device(device), precision)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        with autocast_for(torch.device(device), bf16):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
