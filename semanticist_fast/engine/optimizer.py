"""The optimizer step: AdamW with the reference's parameter groups, behind the seam a distributed engine fills.

The trainer never touches an optimizer directly. It hands each micro-batch loss to `backward` and calls `step`
once per optimizer step; `LocalOptimizerStep` does this for one process. A DeepSpeed engine implements the same
four calls (its own backward scaling, clipping, ZeRO-partitioned state) without the trainer changing.
"""
from typing import Protocol

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


class OptimizerStep(Protocol):
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's mean loss."""

    def step(self, lr: float) -> torch.Tensor:
        """Apply the accumulated gradients at this learning rate; returns the gradient norm before clipping."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LocalOptimizerStep:
    """One process: gradient accumulation, global-norm clipping, AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 grad_clip: float, grad_accum: int = 1):
        self.model, self.grad_clip, self.grad_accum = model, grad_clip, grad_accum
        self.optimizer = build_adamw(model, lr, betas, weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
