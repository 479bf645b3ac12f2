"""Per-image reconstruction metrics on images in [0, 1]."""
import torch


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse(a, b).clamp(min=1e-12))
