"""The Semanticist encoder: a ViT over [cls, patches, slots] where slots read the image causally."""
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..kernels import dispatch
from .layers import Attention, DropPath, Mlp, PatchEmbed

ENCODER_SIZES = {  # name: (dim, depth, heads, patch)
    "tiny": (192, 12, 3, 16),
    "small": (384, 12, 6, 16),
    "base": (768, 12, 12, 16),
    "large": (1024, 24, 16, 16),
    "huge": (1280, 32, 16, 14),
}


@dataclass
class EncoderConfig:
    size: Literal["tiny", "small", "base", "large", "huge", "custom"] = "base"
    dim: Optional[int] = None  # only for size=custom (or to override a named size)
    depth: Optional[int] = None
    heads: Optional[int] = None
    patch_size: Optional[int] = None
    num_slots: int = 256
    slot_dim: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.1

    def resolved(self) -> tuple[int, int, int, int]:
        if self.size == "custom":
            missing = [k for k in ("dim", "depth", "heads", "patch_size") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"encoder.size=custom needs encoder.{', encoder.'.join(missing)} to be set")
            return self.dim, self.depth, self.heads, self.patch_size
        dim, depth, heads, patch = ENCODER_SIZES[self.size]
        return (self.dim or dim, self.depth or depth, self.heads or heads, self.patch_size or patch)

    def validate(self):
        dim, depth, heads, patch = self.resolved()
        if dim % heads:
            raise ValueError(f"encoder dim {dim} must be divisible by encoder heads {heads}")


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, attend):
        x = x + self.drop_path(self.attn(self.norm1(x), attend))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SlotEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, image_size: int):
        super().__init__()
        dim, depth, heads, patch = cfg.resolved()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the encoder patch size {patch}")
        self.num_patches = (image_size // patch) ** 2
        self.num_slots = cfg.num_slots
        self.patch_embed = PatchEmbed(patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches + cfg.num_slots, dim))
        self.slot_embed = nn.Parameter(torch.zeros(1, cfg.num_slots, dim))
        rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth ramps over depth
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self):
        for p in (self.cls_token, self.pos_embed, self.slot_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] (B, 3, H, W) -> normalised slot features (B, num_slots, dim)."""
        x = self.patch_embed(images)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x, self.slot_embed.expand(B, -1, -1)], dim=1)
        x = x + self.pos_embed
        attend = partial(dispatch.slot_encoder_attention, num_image_tokens=1 + self.num_patches)
        for block in self.blocks:
            x = block(x, attend)
        return self.norm(x[:, -self.num_slots:])
