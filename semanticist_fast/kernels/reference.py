"""Plain PyTorch references for every fused op.

These are the ground truth: each fast path in this package (Triton, C++/CUDA, flash-attn) is tested
against the function of the same name here. They are also what runs when fast paths are disabled.
"""
import torch
import torch.nn.functional as F


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift, LayerNorm without affine; shift/scale are (B, C), x is (B, N, C)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    y = y * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    return y.to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with a per-sample gate (B, C) broadcast over tokens of x, y (B, N, C)."""
    return x + gate.unsqueeze(1) * y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, the gate of a SwiGLU FFN (a = w1 x, b = w3 x)."""
    return F.silu(a) * b


def nested_dropout(tokens: torch.Tensor, null: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep the first keep[b] tokens of sample b, replace the rest with the per-position null vector.

    tokens (B, K, D), null (1, K, D) or (K, D), keep (B,) int64 in [0, K].
    """
    K = tokens.shape[1]
    positions = torch.arange(K, device=tokens.device)
    kept = positions.unsqueeze(0) < keep.unsqueeze(1)  # (B, K)
    return torch.where(kept.unsqueeze(-1), tokens, null.reshape(1, K, -1).to(tokens.dtype))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """q, k, v: (B, H, N, Dh). attn_mask: bool, True = may attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def gated_residual_layernorm_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, layernorm_modulate(x + gate * y)): a residual update followed by the next adaLN norm."""
    new_x = gated_residual(x, gate, y)
    return new_x, layernorm_modulate(new_x, shift, scale, eps)


def standardize_tokens(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token (x - mean) / (unbiased std + eps) over the last dim; the tokenizer's output standardisation."""
    xf = x.float()
    y = (xf - xf.mean(-1, keepdim=True)) / (xf.std(-1, keepdim=True) + eps)
    return y.to(x.dtype)
