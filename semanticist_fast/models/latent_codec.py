"""The space the DiT denoises in, behind one interface: raw pixels, or the frozen KL-16 VAE's latents."""
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..common.noise import SampleNoise, noise_or_local


@dataclass
class CodecConfig:
    kind: Literal["pixel", "kl16"] = "kl16"
    path: str = ""  # kl16: a local diffusers-format directory (config.json + diffusion_pytorch_model.safetensors)
    latent_channels: int = 16  # kl16: checked against the VAE's config.json when it loads
    downsample: int = 16

    def validate(self):
        if self.kind == "kl16" and not self.path:
            raise ValueError("codec.kind=kl16 needs codec.path: a local directory with MAR's KL-16 VAE in diffusers "
                             "format (config.json + diffusion_pytorch_model.safetensors); or use codec.kind=pixel")


class PixelCodec(nn.Module):
    """Identity codec: the DiT works on the image itself, rescaled to [-1, 1]. For tiny CPU runs."""

    downsample = 1

    def __init__(self):
        super().__init__()
        self.channels = 3

    def encode(self, images: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents + 1) / 2


class KL16Codec(nn.Module):
    """MAR's KL-16 VAE, frozen: encode samples the posterior and scales; decode undoes both."""

    downsample = 16

    def __init__(self, cfg: CodecConfig, vae: Optional[nn.Module] = None):
        """vae: an AutoencoderKL already built (the planner's weightless one) instead of loading cfg.path."""
        super().__init__()
        from .vae_kl import load_autoencoder_kl

        self.vae, self.scaling_factor = load_autoencoder_kl(cfg.path) if vae is None else (vae, vae.config.scaling_factor)
        self.vae.requires_grad_(False).eval()
        self.channels = self.vae.config.latent_channels
        self.downsample = self.vae.downsample_factor
        if (self.channels, self.downsample) != (cfg.latent_channels, cfg.downsample):
            raise ValueError(f"the VAE in {cfg.path} has {self.channels} latent channels and downsamples by "
                             f"{self.downsample}, but the config says codec.latent_channels={cfg.latent_channels}, "
                             f"codec.downsample={cfg.downsample}; set them to match the VAE")

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never leaves eval mode

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of images in [0, 1]: (mean, logvar), unscaled, float32 (what the latent cache stores)."""
        mean, logvar = self.vae.encode((images * 2 - 1).to(self.dtype))
        return mean.float(), logvar.float()

    @torch.no_grad()
    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        """A posterior sample, scaled; its noise comes from rng (common/noise.py), torch's generator by default."""
        from .vae_kl import sample_posterior

        noise = noise_or_local(rng, mean.device).randn(*mean.shape)
        return sample_posterior(mean.float(), logvar.float(), noise=noise) * self.scaling_factor

    def encode(self, images: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        """sample(posterior(images)): a scaled posterior sample of images in [0, 1]."""
        return self.sample(*self.posterior(images), rng)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode((latents / self.scaling_factor).to(self.dtype)).float() + 1) / 2

    @property
    def dtype(self) -> torch.dtype:
        """The VAE's weights' dtype: fp32, or bf16 when training keeps the frozen parts in bf16 on a GPU."""
        return next(self.vae.parameters()).dtype


def build_codec(cfg: CodecConfig) -> nn.Module:
    if cfg.kind == "pixel":
        return PixelCodec()
    return KL16Codec(cfg)


def codec_weights_file(cfg: CodecConfig) -> Path:
    """The file whose sha256 identifies a KL-16 codec (what a latent cache was encoded with)."""
    from .vae_kl import WEIGHTS_NAME

    return Path(cfg.path) / WEIGHTS_NAME


def codec_geometry(cfg: CodecConfig, image_size: int) -> tuple[int, int]:
    """(channels, spatial size) of the latents, from the config alone (no weights loaded)."""
    if cfg.kind == "pixel":
        return 3, image_size
    if image_size % cfg.downsample:
        raise ValueError(f"model.image_size {image_size} must be divisible by codec.downsample {cfg.downsample}")
    return cfg.latent_channels, image_size // cfg.downsample
