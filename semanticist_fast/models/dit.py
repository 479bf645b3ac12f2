"""The Semanticist decoder: a DiT whose condition is the slot tokens, appended after the patch tokens."""
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.sampling import classifier_free_guidance
from ..kernels import dispatch
from .layers import Attention, FinalLayer, Mlp, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from .sizes import resolve_size

DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, hidden, heads


@dataclass
class DecoderConfig:
    size: Literal["S", "B", "L", "XL", "custom"] = "L"
    depth: Optional[int] = None
    hidden: Optional[int] = None
    heads: Optional[int] = None
    patch_size: Literal[1, 2, 4, 8] = 2
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    repa_block: int = 8  # REPA reads the hidden state after this many blocks
    repa_proj_dim: int = 2048
    repa_target_dim: int = 768
    # Not in the published design. Slots reach the patches only through attention, which cannot express a
    # position-specific linear read-out of a small token set: a tiny DiT learns to read little more than the
    # mean colour. This adds Linear(all slots -> every patch) to the patch tokens, beside the slot tokens.
    linear_slot_path: bool = False

    def resolved(self) -> tuple[int, int, int]:
        """(depth, hidden, heads)."""
        return resolve_size("model.decoder", self.size, DIT_SIZES, ("depth", "hidden", "heads"),
                            (self.depth, self.hidden, self.heads))

    def validate(self):
        depth, hidden, heads = self.resolved()
        if hidden % heads:
            raise ValueError(f"decoder hidden {hidden} must be divisible by decoder heads {heads}")


class DiTBlock(nn.Module):
    """adaLN-Zero block; the norms have no affine, the timestep embedding supplies shift/scale/gate."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.attn = Attention(hidden, heads, qkv_bias=True)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), approximate_gelu="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attn(dispatch.layernorm_modulate(x, shift_msa, scale_msa, 1e-6))
        # One pass adds the attention branch and normalises the result for the MLP.
        x, h = dispatch.gated_residual_layernorm_modulate(x, gate_msa, h, shift_mlp, scale_mlp, 1e-6)
        return dispatch.gated_residual(x, gate_mlp, self.mlp(h))


class SlotDiT(nn.Module):
    def __init__(self, cfg: DecoderConfig, latent_channels: int, latent_size: int, num_slots: int, slot_dim: int):
        super().__init__()
        depth, hidden, heads = cfg.resolved()
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by decoder.patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.in_channels = latent_channels
        self.out_channels = latent_channels * (2 if cfg.learn_sigma else 1)
        self.patch_size = cfg.patch_size
        self.grid = latent_size // cfg.patch_size
        self.num_patches = self.grid ** 2
        self.x_embedder = PatchEmbed(cfg.patch_size, latent_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.autoenc_cond_embedder = nn.Linear(slot_dim, hidden)
        self.slot_to_patches = nn.Linear(num_slots * slot_dim, self.num_patches * hidden) if cfg.linear_slot_path else None
        # The learned per-position null slot: nested dropout fills dropped positions with it, and the all-null
        # condition is the unconditional branch of classifier-free guidance.
        self.null_cond = nn.Parameter(torch.zeros(1, num_slots, slot_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid).unsqueeze(0))
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, cfg.mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, cfg.patch_size ** 2 * self.out_channels)
        self.repa_block = cfg.repa_block if 0 < cfg.repa_block <= depth else 0
        self.projector = nn.Sequential(
            nn.Linear(hidden, cfg.repa_proj_dim), nn.SiLU(),
            nn.Linear(cfg.repa_proj_dim, cfg.repa_proj_dim), nn.SiLU(),
            nn.Linear(cfg.repa_proj_dim, cfg.repa_target_dim),
        ) if self.repa_block else None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        if self.slot_to_patches is not None:
            nn.init.normal_(self.slot_to_patches.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        p, g, c = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, tokens, keep: Optional[torch.Tensor] = None, return_repa: bool = False):
        """x: noisy latents (B, C, H, W); t: (B,) timesteps; tokens: (B, K, slot_dim).

        keep (B,): sample b is conditioned on its first keep[b] tokens, the rest become the learned null slots
        (nested dropout: training draws keep, decoding from the first k tokens passes k); None keeps every token.
        This is the one place the null slots enter: under ZeRO-3 a parameter is gathered only inside its own
        module's forward, so null_cond is read here and nowhere else.
        """
        slots = tokens if keep is None else dispatch.nested_dropout(tokens, self.null_cond, keep)
        h = self.x_embedder(x) + self.pos_embed
        slots = slots.to(h.dtype)
        if self.slot_to_patches is not None:
            h = h + self.slot_to_patches(slots.flatten(1)).view_as(h)
        h = torch.cat([h, self.autoenc_cond_embedder(slots)], dim=1)
        c = self.t_embedder(t)
        repa = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if return_repa and self.projector is not None and i + 1 == self.repa_block:
                repa = self.projector(h[:, :self.num_patches])
        out = self.unpatchify(self.final_layer(h[:, :self.num_patches], c))
        return (out, repa) if return_repa else out

    def forward_guided(self, x, t, tokens, guidance, keep: Optional[torch.Tensor] = None):
        """Classifier-free guided output for a batch x: the conditional branch (tokens, keep as in forward) and the
        all-null branch (keep 0) run as one doubled batch. Guidance applies to the predicted epsilon (or velocity)
        channels only; learned-variance channels come from the conditional branch. guidance: a float (1.0: no
        guidance, one branch) or a 0-d tensor (an exported step, which always runs both branches).
        """
        if not torch.is_tensor(guidance) and guidance == 1.0:
            return self(x, t, tokens, keep)
        if keep is None:
            keep = torch.full_like(tokens[:, 0, 0], tokens.shape[1], dtype=torch.long)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([tokens, tokens]),
                   torch.cat([keep, torch.zeros_like(keep)]))
        return classifier_free_guidance(out, guidance, self.in_channels)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity between projected DiT tokens and teacher patch tokens, per sample.

    projected: (B, g*g, D) on the DiT's patch grid; target: (B, G*G, D) on the teacher's grid. The DiT grid is
    upsampled bicubically to the teacher's when they differ (8x8 -> 16x16 for 256 px, patch 2, KL-16).
    """
    B, n, D = projected.shape
    g, G = int(round(n ** 0.5)), int(round(target.shape[1] ** 0.5))
    if g != G:
        grid = projected.transpose(1, 2).reshape(B, D, g, g).float()
        projected = F.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    cos = F.cosine_similarity(F.normalize(projected.float(), dim=-1), F.normalize(target.float(), dim=-1), dim=-1)
    return -cos.mean(dim=1)
