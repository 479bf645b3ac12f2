"""Layers shared by the ViT encoder, the DiT decoder, the diffusion head and the frozen DINOv2 teacher."""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import dispatch


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate_gelu: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate_gelu = approximate_gelu

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate_gelu))


class Attention(nn.Module):
    """Multi-head self-attention; the caller chooses the attention pattern through `attend`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attend=dispatch.attention):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class FinalLayer(nn.Module):
    """adaLN output layer (DiT's and MAR's diffusion head's): LayerNorm without affine, shifted and scaled by the
    conditioning vector c, then a linear. concat_dim > 0: a condition of that width joins after the modulation
    (the head's "concat" conditioning). Zero-initialised by the owner (adaLN-Zero)."""

    def __init__(self, hidden: int, out_features: int, concat_dim: int = 0):
        super().__init__()
        self.hidden = hidden
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden + concat_dim, out_features)

    def forward(self, x, c, concat: Optional[torch.Tensor] = None):
        """x (B, N, hidden) with c (B, hidden), one modulation per sample over its tokens (the DiT, on the fused
        kernel); or x (N, hidden) with c (N or 1, hidden), one per row (the head)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        if x.ndim == c.ndim:
            h = F.layer_norm(x, (self.hidden,), eps=1e-6) * (1 + scale) + shift
        else:
            h = dispatch.layernorm_modulate(x, shift, scale, 1e-6)
        if concat is not None:
            h = torch.cat([h, concat], dim=-1)
        return self.linear(h)


class DropPath(nn.Module):
    """Stochastic depth per sample: sample b's branch is dropped when its uniform draw u[b] >= the keep probability.
    The caller draws u (B,) (see common/noise.py), so compiled blocks take it as an input and runs on any number of
    ranks drop the same samples."""

    def __init__(self, p: float):
        super().__init__()
        self.active = p > 0.0
        # A tensor, not a Python float: torch.compile would specialise a graph on every distinct rate of the ramp.
        self.register_buffer("keep_prob", torch.tensor(1.0 - p), persistent=False)

    def forward(self, x, u: Optional[torch.Tensor] = None):
        if not self.active or not self.training:
            return x
        if u is None:
            u = torch.rand(x.shape[0], device=x.device)
        keep = u.view(x.shape[0], *([1] * (x.ndim - 1))) < self.keep_prob
        return x * keep.to(x.dtype) / self.keep_prob.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_size**2, dim): half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # DiT's convention: the first half encodes the column (w) coordinate, the second the row (h).
    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()
