"""Frozen DINOv2 ViT used as the REPA target: images in [0, 1] -> final-norm patch tokens.

Parameter names follow the official torch-hub checkpoints (e.g. dinov2_vitb14_pretrain.pth), so those load
strictly. Weights are only ever read from a local file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Attention, Mlp, PatchEmbed
from .weights import load_model_state, read_weights, strip_prefixes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official interpolation adds this to the target grid to dodge floor() rounding, and passes a scale factor
# rather than a size; torch then maps coordinates with that exact factor, so we must do the same to match.
_POS_INTERP_OFFSET = 0.1


@dataclass(frozen=True)
class DinoV2Config:
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    patch_size: int = 14
    img_size: int = 518  # training resolution: the stored position grid is img_size // patch_size (37 for B/14)
    input_size: int = 224  # images are resized to this before patching: 16 x 16 tokens for B/14
    mlp_ratio: float = 4.0

    @property
    def stored_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def token_grid(self) -> int:
        return self.input_size // self.patch_size


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attend=F.scaled_dot_product_attention))  # plain SDPA, as DINOv2
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, token_grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) stored embedding -> (1, 1 + g*g, D) for a g x g token grid, as DINOv2 does it."""
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    m = math.isqrt(patch_pos.shape[1])
    if m * m != patch_pos.shape[1]:
        raise ValueError(f"pos_embed holds {patch_pos.shape[1]} patch positions, not a square grid")
    if m == token_grid:
        return torch.cat([cls_pos, patch_pos], dim=1)
    dim = patch_pos.shape[-1]
    scale = (token_grid + _POS_INTERP_OFFSET) / m
    grid = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic")
    assert grid.shape[-2:] == (token_grid, token_grid)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, token_grid * token_grid, dim)], dim=1)


class DinoV2(nn.Module):
    def __init__(self, cfg: DinoV2Config = DinoV2Config()):
        super().__init__()
        if cfg.embed_dim % cfg.heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by heads {cfg.heads}")
        self.config = cfg
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.stored_grid**2, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused (masked training only); kept for strict loading
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, d)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Resampled once per weight load instead of every call; float32 like the official code.
        self.register_buffer("pos_embed_resized", torch.empty(0), persistent=False)
        self.refresh_pos_embed()
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh_pos_embed())

    def _apply(self, fn, recurse=True):
        # A cast of the frozen teacher to bf16 (training keeps it in bf16 on a GPU) is for the weights only: the
        # normalisation constants and the resampled position embedding stay the fp32 values the official
        # preprocessing uses (bf16 would make the mean 0.485 -> 0.484375); they still follow a change of device.
        kept = {name: getattr(self, name) for name in ("image_mean", "image_std", "pos_embed_resized")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        self.pos_embed_resized = interpolate_pos_embed(self.pos_embed.detach(), self.config.token_grid)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], any size -> input_size x input_size, ImageNet-normalised."""
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic")
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> final-norm tokens (B, 1 + g*g, D), class token first."""
        g = self.config.token_grid
        if x.shape[-2:] != (g * self.config.patch_size, g * self.config.patch_size):
            raise ValueError(f"expected {self.config.input_size}px inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed_resized.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> patch tokens (B, g*g, D) (DINOv2's x_norm_patchtokens)."""
        return self.forward_features(self.preprocess(images))[:, 1:]


# Namespaces that a container can put in front of every key (the wrappers' prefixes are stripped anyway).
_SHARED_PREFIXES = ("backbone.", "model.")


def _normalise_keys(state_dict: dict[str, torch.Tensor], model: DinoV2) -> dict[str, torch.Tensor]:
    """Accepted layouts: the official torch-hub one exactly; the timm one, which is the same minus `mask_token`
    (filled with the model's zeros: it is never used here); either with every key under one namespace."""
    state_dict = strip_prefixes(state_dict, shared=_SHARED_PREFIXES)
    if "mask_token" not in state_dict:
        state_dict["mask_token"] = model.mask_token.detach().clone()
    return state_dict


def load_dinov2(path: str, device: torch.device | str | None = None, config: DinoV2Config | None = None) -> DinoV2:
    """Frozen eval-mode DINOv2 from a local state dict; default config is ViT-B/14 (dinov2_vitb14_pretrain.pth)."""
    model = DinoV2(config or DinoV2Config())
    state_dict = _normalise_keys(read_weights(path), model)
    load_model_state(model, state_dict, what=f"DINOv2 state dict {path!r} ({model.config})")
    model.requires_grad_(False).eval()
    return model.to(device) if device is not None else model


def small_test_dinov2(
    embed_dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    patch_size: int = 14,
    img_size: int = 98,
    input_size: int = 56,
    seed: int = 0,
) -> tuple[DinoV2, dict[str, torch.Tensor]]:
    """A tiny randomly weighted model and its state dict in the official layout (every tensor non-trivial)."""
    cfg = DinoV2Config(embed_dim, depth, heads, patch_size, img_size, input_size)
    model = DinoV2(cfg)
    gen = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            state_dict[name] = 1.0 + 0.2 * noise
        else:
            state_dict[name] = 0.2 * noise
    model.load_state_dict(state_dict, strict=True)
    model.requires_grad_(False).eval()
    return model, state_dict
