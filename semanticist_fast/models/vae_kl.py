"""Frozen LDM KL autoencoder (MAR's KL-16) read from a local diffusers AutoencoderKL directory.

Module and parameter names mirror diffusers' AutoencoderKL so its `diffusion_pytorch_model.safetensors` loads
strictly, without diffusers being installed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import load_model_state, read_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_EPS = 1e-6

# Config fields that do not change the computation here (tiling / upcast / bookkeeping hints).
_IGNORED_FIELDS = {"sample_size", "force_upcast", "_class_name", "_diffusers_version", "_name_or_path",
                   "_use_default_values"}


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.2325

    @classmethod
    def from_dict(cls, cfg: dict) -> VAEConfig:
        """Parse a diffusers AutoencoderKL config, refusing any field that would change the architecture."""
        n = len(cfg.get("block_out_channels", ()))
        if n == 0:
            raise ValueError("VAE config lacks block_out_channels")
        required = {
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            "mid_block_add_attention": True,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, want in required.items():
            if key not in cfg:
                continue
            got = list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]
            if got != want and not (key == "shift_factor" and got == 0):
                raise ValueError(f"unsupported VAE config: {key}={cfg[key]!r} (only {want!r} is implemented)")
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"unsupported VAE class {cfg['_class_name']!r}: expected AutoencoderKL")
        fields = {"block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
                  "norm_num_groups", "scaling_factor"}
        unknown = sorted(set(cfg) - fields - set(required) - _IGNORED_FIELDS)
        if unknown:
            warnings.warn(f"ignoring unknown VAE config fields {unknown}")
        defaults = cls()
        return cls(
            block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
            # diffusers' own defaults, not MAR's, apply to fields a diffusers config leaves out.
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            in_channels=int(cfg.get("in_channels", defaults.in_channels)),
            out_channels=int(cfg.get("out_channels", defaults.out_channels)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        )

    def to_dict(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
        }


def small_test_config() -> dict:
    """Tiny diffusers-compatible config (downsample 4) for tests."""
    return VAEConfig(block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                     scaling_factor=0.5).to_dict()


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=_EPS)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # a list only so the key reads to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero pad (right/bottom only), as the LDM weights were trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([AttnBlock(c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        ])
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups)
        # up_blocks[0] runs at the lowest resolution, with the widest channels.
        self.up_blocks = nn.ModuleList([
            UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, upsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        ])
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> posterior (mean, logvar), unscaled; logvar clamped to [-30, 20] like diffusers."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in (roughly) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def sample_posterior(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """A draw from the diagonal Gaussian posterior; `noise` (standard normal, mean's shape) when the caller drew it."""
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)


def _rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older diffusers saved the mid-block attention as query/key/value/proj_attn, sometimes as 1x1 convs."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for name, tensor in state_dict.items():
        parts = name.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in renames:
            name = ".".join(parts[:-2] + [renames[parts[-2]], parts[-1]])
            if tensor.dim() == 4:
                tensor = tensor[:, :, 0, 0]
        out[name] = tensor
    return out


def load_autoencoder_kl(
    path: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[AutoencoderKL, float]:
    """Frozen eval-mode autoencoder and its latent scaling factor from a local diffusers-format directory."""
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise FileNotFoundError(f"expected {CONFIG_NAME} and {WEIGHTS_NAME} in {path!r}")
    with open(config_path) as f:
        cfg = VAEConfig.from_dict(json.load(f))
    model = AutoencoderKL(cfg)
    state_dict = _rename_legacy_keys(read_weights(weights_path))
    load_model_state(model, state_dict, what=f"VAE weights in {path!r} ({cfg})")
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype), cfg.scaling_factor


def save_autoencoder_kl(model: AutoencoderKL, config: dict, path: str) -> None:
    """Write `config` and the weights in the diffusers layout (load_autoencoder_kl and diffusers both read it)."""
    from safetensors.torch import save_file

    if VAEConfig.from_dict(config) != model.config:
        raise ValueError(f"config {config} does not describe the model ({model.config})")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(path, WEIGHTS_NAME))
