"""The network evaluations a sampler repeats, as modules that torch.export traces: one call each, plain tensors in
and out. The loops around them (tokens, sampler steps, noise) stay in Python: semanticist_fast/export/runtime.py.

- ARPrefill(labels, *caches) and ARDecode(token, input_pos, *caches): one position of the AR transformer with the
  static KV cache, which the caller owns and passes as inputs (one key and one value tensor per layer, each
  (rows, heads, num_tokens, head_dim)); the step writes its position into them in place. Both return the head's
  embedded condition for the next token (the diffusion head embeds it once per token, not once per step).
- HeadStep(x, t, cond_emb[, guidance]): one network evaluation of the diffusion head, CFG batch included.
- DecoderStep(x, t, tokens, num_tokens[, guidance]): one DiT evaluation, the null slots from num_tokens on (the
  AR's tokens, or the first k of them: generation from a prefix) and the CFG batch inside.
- LatentDecode(latents): the codec's decode to images in [0, 1].

With guidance, rows = 2 * batch (conditional rows, then unconditional ones) and guidance is a 0-d tensor input,
so one package serves any scale. The models are traced through their plain PyTorch paths (no C++ extension,
Triton or flash-attn ops), so a package needs only torch to run.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..diffusion.sampling import guided_denoiser
from ..models.gpt import GPT
from ..models.tokenizer import SemanticistTokenizer


def _cached_step(gpt: GPT, caches, labels, tokens, input_pos) -> torch.Tensor:
    gpt.attach_caches(list(zip(caches[0::2], caches[1::2])))
    try:
        cond = gpt(labels, tokens, input_pos)[:, -1]
    finally:
        gpt.reset_caches()
    return gpt.diffloss.net.cond_embed(cond)


class ARPrefill(nn.Module):
    """Class labels (rows,) at position 0 -> the embedded condition (rows, head_width) of token 0."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, labels: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        position = torch.zeros(1, dtype=torch.long, device=labels.device)
        return _cached_step(self.gpt, caches, labels, None, position)


class ARDecode(nn.Module):
    """Token k - 1 (rows, 1, token_dim) at position input_pos = [k] -> the embedded condition of token k."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, token: torch.Tensor, input_pos: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        return _cached_step(self.gpt, caches, None, token, input_pos)


class HeadStep(nn.Module):
    """x (batch, token_dim), t (1,) shared by the rows, cond_emb (rows, head_width) -> the head's (guided) output."""

    def __init__(self, gpt: GPT, guided: bool):
        super().__init__()
        self.net = gpt.diffloss.net
        self.token_dim = gpt.diffloss.token_dim
        self.guided = guided

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        def call(x_rows, t_rows):
            return self.net.denoise(x_rows, t_rows, cond_emb)

        if not self.guided:
            return call(x, t)
        return guided_denoiser(call, guidance, self.token_dim)(x, t)


class DecoderStep(nn.Module):
    """x (batch, C, H, W) noisy latents, t (batch,) float timesteps, tokens (batch, n, slot_dim) the AR's n tokens,
    num_tokens (1,) int64 k <= n -> the DiT's (guided) output; the slots from k on are the learned null slots, as
    Tokenizer.decode(tokens, num_tokens=k) makes them."""

    def __init__(self, model: SemanticistTokenizer, guided: bool):
        super().__init__()
        self.model = model
        self.guided = guided

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, num_tokens: torch.Tensor,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = tokens.new_zeros(tokens.shape[0], self.model.num_slots - tokens.shape[1], tokens.shape[2])
        tokens = torch.cat([tokens, padding], dim=1)
        keep = num_tokens.expand(tokens.shape[0])
        return self.model.dit.forward_guided(x, t, tokens, guidance if self.guided else 1.0, keep)


class LatentDecode(nn.Module):
    def __init__(self, codec: nn.Module):
        super().__init__()
        self.codec = codec

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents).clamp(0, 1)


class Autocast(nn.Module):
    """A step traced under bf16 autocast (a bf16 CUDA export): the casts go into the graph; the output is fp32, as
    the eager sampler keeps its state."""

    def __init__(self, step: nn.Module, device_type: str):
        super().__init__()
        self.step, self.device_type = step, device_type

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.step(*args).float()
