"""AdamW with the reference's parameter groups: weight decay on >= 2-D weights only."""
import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    device_type = next(model.parameters()).device.type
    # The fused kernel is one launch for all tensors on GPU; elsewhere the foreach path is the fast one.
    fused = device_type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused, foreach=not fused)
