"""epsilon-LlamaGen: a LlamaGen-style decoder-only transformer over continuous tokens, with a diffusion head.

Sequence position 0 holds the class embedding, position p >= 1 the projection of token p - 1. The output at
position p (after the final RMSNorm, plus a learned per-position "diffusion position" embedding) conditions the
head's prediction of token p. Parameter names follow the official checkpoint, so converting it is a renaming at most.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..common.noise import SampleNoise, noise_or_local
from ..kernels import dispatch
from .diffusion_head import DiffusionHead
from .sizes import resolve_size

GPT_SIZES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536)}  # layers, heads, dim


@dataclass
class GPTConfig:
    size: Literal["B", "L", "XL", "XXL", "custom"] = "L"
    layers: Optional[int] = None
    heads: Optional[int] = None
    dim: Optional[int] = None
    token_dim: int = 16
    num_tokens: int = 32  # tokens modelled (a prefix of the tokenizer's slots)
    num_classes: int = 1000
    class_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    head_width: int = 1536
    head_depth: int = 12
    head_cond: Literal["concat", "adaln"] = "concat"
    head_objective: Literal["flow", "ddpm"] = "flow"  # flow = the reference's use_si
    diffusion_batch_mul: int = 4
    head_sample_steps: int = 250
    head_ddpm_schedule: str = "cosine"

    def resolved(self) -> tuple[int, int, int]:
        """(layers, heads, dim)."""
        return resolve_size("model", self.size, GPT_SIZES, ("layers", "heads", "dim"), (self.layers, self.heads, self.dim))

    def validate(self):
        _, heads, dim = self.resolved()
        if dim % heads:
            raise ValueError(f"gpt dim {dim} must be divisible by gpt heads {heads}")


def ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    hidden = int(8 * dim / 3)
    return (hidden + multiple_of - 1) // multiple_of * multiple_of


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return dispatch.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys/values (max_batch, heads, max_seq, head_dim), written in place at the decoded positions.

    Not module state (never in the state dict): setup_caches allocates them, and an exported decode step
    (semanticist_fast/export) attaches caches it receives as inputs, so the caller owns them.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        self.k_cache, self.v_cache = k_cache, v_cache

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, S, Dh) at positions input_pos (S,); return this batch's full caches."""
        batch = k.shape[0]
        k_all, v_all = self.k_cache[:batch], self.v_cache[:batch]
        k_all.index_copy_(2, input_pos, k.to(k_all.dtype))
        v_all.index_copy_(2, input_pos, v.to(v_all.dtype))
        return k_all, v_all


class CausalSelfAttention(nn.Module):
    """LLaMA-style causal self-attention (no biases, the official wqkv / wo names) that decodes from a KV cache."""

    def __init__(self, dim: int, heads: int, resid_dropout: float):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        B, S, _ = x.shape
        q, k, v = self.wqkv(x).view(B, S, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        if input_pos is None:
            out = dispatch.attention(q, k, v, is_causal=True)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            out = dispatch.attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, S, self.dim)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dropout: float):
        super().__init__()
        hidden = ffn_hidden(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(dispatch.swiglu(self.w1(x), self.w3(x))))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, resid_dropout: float, ffn_dropout: float):
        super().__init__()
        self.attention = CausalSelfAttention(dim, heads, resid_dropout)
        self.feed_forward = FeedForward(dim, ffn_dropout)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)

    def forward(self, x, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra entry (index num_classes) for the null class of CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        layers, heads, dim = config.resolved()
        self.dim, self.heads = dim, heads
        self.num_tokens = config.num_tokens
        self.num_classes = config.num_classes

        self.cls_embedding = LabelEmbedder(config.num_classes, dim)
        self.z_proj = nn.Linear(config.token_dim, dim)
        self.z_proj_ln = RMSNorm(dim)
        # One position more than ever used (the last token is never fed back), kept for the official layout.
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, config.num_tokens + 1, dim))
        self.layers = nn.ModuleList(
            [TransformerBlock(dim, heads, config.resid_dropout, config.ffn_dropout) for _ in range(layers)])
        self.norm = RMSNorm(dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        self.initialize_weights()
        # Built after the init above: the head keeps its own (MAR) initialisation.
        self.diffloss = DiffusionHead(config.token_dim, dim, config.head_width, config.head_depth, config.head_cond,
                                      config.head_objective, config.head_sample_steps, config.head_ddpm_schedule)
        self.causal_mask: Optional[torch.Tensor] = None

    def initialize_weights(self):
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        nn.init.normal_(self.diffusion_pos_embed_learned, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- KV cache ---------------------------------------------------------------------------------------------------
    def cache_shape(self, max_batch: int) -> tuple[int, int, int, int]:
        """The shape of each layer's key (and value) cache: the whole sequence, class + num_tokens - 1 tokens."""
        return max_batch, self.heads, self.num_tokens, self.dim // self.heads

    def setup_caches(self, max_batch: int, dtype: torch.dtype, device) -> None:
        """Allocate static caches for up to max_batch rows and the whole sequence."""
        shape = self.cache_shape(max_batch)
        self.attach_caches([(torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device)) for _ in self.layers])

    def attach_caches(self, caches) -> None:
        """Decode with the given (key, value) cache tensors, one pair per layer, each of cache_shape(rows)."""
        if len(caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (key, value) cache pairs, one per layer, got {len(caches)}")
        for layer, (k, v) in zip(self.layers, caches):
            layer.attention.kv_cache = KVCache(k, v)
        self.causal_mask = torch.ones(self.num_tokens, self.num_tokens, dtype=torch.bool,
                                      device=caches[0][0].device).tril()

    def reset_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, labels: Optional[torch.Tensor], tokens: Optional[torch.Tensor],
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head conditions for the given sequence positions -> (B, S, dim).

        labels (B,) fills position 0 and tokens (B, n, token_dim) the positions after it; either may be None
        (decoding feeds only tokens). input_pos None: a full causal pass over positions 0..S-1 without cache.
        input_pos (S,): those positions, read from and written to the KV cache (see setup_caches).
        The condition at position p predicts token p.
        """
        if labels is None and tokens is None:
            raise ValueError("GPT.forward needs labels, tokens or both")
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels).unsqueeze(1))
        if tokens is not None:
            parts.append(self.z_proj(tokens))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        S = h.shape[1]
        if input_pos is None:
            h = h + self.pos_embed_learned[:, :S]
            mask = None
        else:
            h = h + self.pos_embed_learned[0, input_pos]
            mask = self.causal_mask[input_pos]
        h = self.z_proj_ln(h)
        for layer in self.layers:
            h = layer(h, input_pos, mask)
        h = self.norm(h)
        if input_pos is None:
            return h + self.diffusion_pos_embed_learned[:, :S]
        return h + self.diffusion_pos_embed_learned[0, input_pos]

    def drop_labels(self, labels: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training, for CFG)."""
        drop = noise_or_local(rng, labels.device).rand(labels.shape[0]) < self.config.class_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        """Scalar training loss. tokens (B, N >= num_tokens, token_dim): the first num_tokens are modelled.
        rng: where the per-sample draws come from (common/noise.py; torch's generator by default)."""
        if tokens.shape[1] < self.num_tokens:
            raise ValueError(f"need at least {self.num_tokens} tokens per sample, got {tokens.shape[1]}")
        rng = noise_or_local(rng, tokens.device)
        B, N, D = tokens.shape[0], self.num_tokens, tokens.shape[2]
        target = tokens[:, :N]
        if self.training and self.config.class_dropout > 0:
            labels = self.drop_labels(labels, rng)
        # The last token is never an input: its output would predict token num_tokens, which is not modelled.
        cond = self(labels, target[:, :-1])
        mul = self.config.diffusion_batch_mul
        t, noise = self.diffloss.training_draws(rng, B, mul * N)
        # Rows follow the repeat below: copy m of token n of sample b is row (m * B + b) * N + n.
        t = t.view(B, mul, N).transpose(0, 1).reshape(-1)
        noise = noise.view(B, mul, N, D).transpose(0, 1).reshape(-1, D)
        target = target.reshape(-1, D).repeat(mul, 1)
        cond = cond.reshape(-1, cond.shape[-1]).repeat(mul, 1)
        return self.diffloss.loss(target, cond, t, noise.to(target.dtype)).mean()
