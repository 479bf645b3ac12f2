"""Class-conditional sampling of continuous tokens with epsilon-LlamaGen.

Fast path: static KV cache, the class token prefilled, then one position per step; the diffusion head makes one
network call per SDE step. Naive path (use_kv_cache=False, sampler="sde_naive"): the full prefix is re-run every
step and the head calls its network twice per step, as the reference does; it exists to benchmark against.
"""
from typing import Literal, Optional

import torch

from .models.gpt import GPT


def cfg_at(cfg_scale: float, k: int, num_tokens: int, schedule: Literal["linear", "constant"] = "linear") -> float:
    """Guidance scale for token k (0-based): "linear" is 1 + (cfg - 1)(k + 1) / num_tokens, reaching cfg at the end."""
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (k + 1) / num_tokens
    if schedule == "constant":
        return cfg_scale
    raise ValueError(f"cfg schedule {schedule!r} is not supported; choose 'linear' or 'constant'")


@torch.no_grad()
def generate(gpt: GPT, labels: torch.Tensor, cfg_scale: float = 1.0,
             cfg_schedule: Literal["linear", "constant"] = "linear", temperature: float = 1.0,
             generator: Optional[torch.Generator] = None, head_steps: Optional[int] = None,
             sampler: Literal["sde", "sde_naive", "ode"] = "sde", use_kv_cache: bool = True) -> torch.Tensor:
    """Sample tokens (B, num_tokens, token_dim) float32 for class labels (B,).

    cfg_scale != 1 doubles the batch with the null class; both halves share the head's noise. head_steps None
    uses the config's head_sample_steps. The model runs in eval mode here and is restored afterwards.
    """
    cfg_at(cfg_scale, 0, gpt.num_tokens, cfg_schedule)  # fail fast on an unknown schedule name
    guided = cfg_scale != 1.0
    batch, num_tokens = labels.shape[0], gpt.num_tokens
    device = labels.device
    all_labels = torch.cat([labels, torch.full_like(labels, gpt.num_classes)]) if guided else labels
    in_dtype = gpt.z_proj.weight.dtype
    tokens = torch.zeros(batch, num_tokens, gpt.config.token_dim, device=device)

    was_training = gpt.training
    gpt.eval()
    if use_kv_cache:
        cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else in_dtype
        gpt.setup_caches(all_labels.shape[0], cache_dtype, device)
        positions = torch.arange(num_tokens, device=device)  # built once: no host-to-device copy per token
    try:
        for k in range(num_tokens):
            if use_kv_cache:
                prev = None if k == 0 else tokens[:, k - 1:k]
                pos = positions[k:k + 1]
            else:
                prev = None if k == 0 else tokens[:, :k]
                pos = None
            if prev is not None:
                prev = (torch.cat([prev, prev]) if guided else prev).to(in_dtype)
            # Prefill (k = 0) feeds the class token; later steps feed only the newest token when cached.
            step_labels = all_labels if (k == 0 or not use_kv_cache) else None
            cond = gpt(step_labels, prev, pos)[:, -1]
            cfg_k = cfg_at(cfg_scale, k, num_tokens, cfg_schedule) if guided else None
            tokens[:, k] = gpt.diffloss.sample(cond, cfg_k, temperature, generator, head_steps, sampler)
    finally:
        if use_kv_cache:
            gpt.reset_caches()
        gpt.train(was_training)
    return tokens
