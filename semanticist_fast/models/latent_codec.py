"""The space the DiT denoises in, behind one interface: raw pixels, or the frozen KL-16 VAE's latents."""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn


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

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents + 1) / 2


class KL16Codec(nn.Module):
    """MAR's KL-16 VAE, frozen: encode samples the posterior and scales; decode undoes both."""

    downsample = 16

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        from .vae_kl import load_autoencoder_kl

        self.vae, self.scaling_factor = load_autoencoder_kl(cfg.path)
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
    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        from .vae_kl import sample_posterior

        return sample_posterior(*self.vae.encode(images * 2 - 1), generator=generator) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(latents / self.scaling_factor) + 1) / 2


def build_codec(cfg: CodecConfig) -> nn.Module:
    if cfg.kind == "pixel":
        return PixelCodec()
    return KL16Codec(cfg)


def codec_geometry(cfg: CodecConfig, image_size: int) -> tuple[int, int]:
    """(channels, spatial size) of the latents, from the config alone (no weights loaded)."""
    if cfg.kind == "pixel":
        return 3, image_size
    if image_size % cfg.downsample:
        raise ValueError(f"model.image_size {image_size} must be divisible by codec.downsample {cfg.downsample}")
    return cfg.latent_channels, image_size // cfg.downsample
