"""Reconstruction metrics against plain reference computations, and the reconstruction report."""
import math

import pytest
import torch

from semanticist_fast.eval.metrics import flat_images, mse, psnr, ssim


def reference_ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one image pair written out position by position (Wang et al. 2004, valid windows only)."""
    coords = [i - (size - 1) / 2 for i in range(size)]
    g = [math.exp(-c * c / (2 * sigma * sigma)) for c in coords]
    w = torch.tensor([[gi * gj for gj in g] for gi in g], dtype=torch.float64)
    w = w / w.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for ch in range(a.shape[0]):
        x, y = a[ch].double(), b[ch].double()
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(sum(values) / len(values))


def test_ssim_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 14, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(2):
        assert ours[i].item() == pytest.approx(reference_ssim(a[i], b[i]), abs=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert ssim(a, b)[0] > ssim(a, (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(0, 1))[0]


def test_psnr_mse_and_the_flat_baseline():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    flat = flat_images(images)
    assert torch.allclose(flat[:, :, 3, 5], images.mean(dim=(2, 3)))
    assert torch.allclose(mse(flat, images), images.var(dim=(2, 3), unbiased=False).mean(dim=1))
    assert torch.allclose(psnr(flat, images), 10 * torch.log10(1 / mse(flat, images)))
    # The flat image is the best constant per image: any other colour has a larger MSE.
    assert (mse(flat + 0.05, images) > mse(flat, images)).all()
