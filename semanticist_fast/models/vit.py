"""The Semanticist encoder: a ViT over [cls, patches, slots] where slots read the image causally."""
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..common.noise import SampleNoise, noise_or_local
from ..kernels import dispatch
from .layers import Attention, DropPath, Mlp, PatchEmbed
from .sizes import resolve_size

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
    # Initial scale of the learned position embedding (timm's 0.02 by default). With few patches and a short
    # schedule, 0.02 leaves the slots' attention blind to where a patch is for most of training.
    pos_embed_std: float = 0.02
    # "unit": the published encoder sees pixels in [0, 1]; "signed": 2x - 1, so the patch embedding starts without
    # the large shared offset that makes every patch look alike (the mean colour) to a freshly initialised encoder.
    input_range: Literal["unit", "signed"] = "unit"

    def resolved(self) -> tuple[int, int, int, int]:
        """(dim, depth, heads, patch_size)."""
        return resolve_size("model.encoder", self.size, ENCODER_SIZES, ("dim", "depth", "heads", "patch_size"),
                            (self.dim, self.depth, self.heads, self.patch_size))

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

    def forward(self, x, attend, drop_u: Optional[torch.Tensor] = None):
        """drop_u: (B, 2) uniform draws deciding stochastic depth of the two branches (None: drawn here)."""
        u_attn, u_mlp = (None, None) if drop_u is None else drop_u.unbind(1)
        x = x + self.drop_path(self.attn(self.norm1(x), attend), u_attn)
        return x + self.drop_path(self.mlp(self.norm2(x)), u_mlp)


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
        self.signed_input = cfg.input_range == "signed"
        self.stochastic_depth = cfg.drop_path > 0
        self._init_weights(cfg.pos_embed_std)

    def _init_weights(self, pos_embed_std: float):
        for p, std in ((self.cls_token, 0.02), (self.pos_embed, pos_embed_std), (self.slot_embed, 0.02)):
            nn.init.trunc_normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        """images in [0, 1] (B, 3, H, W) -> normalised slot features (B, num_slots, dim).
        rng: where training draws the stochastic-depth masks (common/noise.py)."""
        x = self.patch_embed(images * 2 - 1 if self.signed_input else images)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x, self.slot_embed.expand(B, -1, -1)], dim=1)
        x = x + self.pos_embed
        attend = partial(dispatch.slot_encoder_attention, num_image_tokens=1 + self.num_patches)
        drop_u = None
        if self.training and self.stochastic_depth:
            drop_u = noise_or_local(rng, x.device).rand(B, len(self.blocks), 2)
        for i, block in enumerate(self.blocks):
            x = block(x, attend, None if drop_u is None else drop_u[:, i])
        return self.norm(x[:, -self.num_slots:])
