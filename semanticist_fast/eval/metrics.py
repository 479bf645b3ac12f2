"""Per-image reconstruction metrics on images in [0, 1], and the trivial baseline they are read against."""
import torch
import torch.nn.functional as F


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse(a, b).clamp(min=1e-12))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1,
    statistics over the window's valid positions, averaged over positions and channels. Computed in float64:
    the variances are differences of local means, which float32 gets wrong by ~2e-5 in SSIM."""
    a, b = a.double(), b.double()
    channels = a.shape[1]
    window = min(window, a.shape[-2], a.shape[-1])
    g = _gaussian_window(window, sigma).to(a.device, torch.float64)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def local_mean(x):
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).float()


def flat_images(images: torch.Tensor) -> torch.Tensor:
    """Each image painted its mean colour: what a tokenizer that carries nothing but colour reconstructs."""
    return images.float().mean(dim=(2, 3), keepdim=True).expand_as(images)
