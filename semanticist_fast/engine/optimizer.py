"""The optimizer step: AdamW with the reference's parameter groups, the part of each engine (engine/engines.py)
that turns micro-batch losses into an update.

An engine hands each micro-batch loss to `backward`, calls `step` once per optimizer step, and reaches the state
its EMA averages and checkpoints store through `shard()` (engine/shard.py). `LocalOptimizerStep` does this for one
process; `engine.zero.DeepSpeedOptimizerStep` for ZeRO over many.

A step whose gradient norm is not finite leaves the weights and the moments as they were (the fused AdamW's
`found_inf`, decided on the device: no host sync); the trainer reports it and stops or goes on as configured.
DeepSpeed skips such steps in the same way on its side.
"""
from typing import Protocol

import torch

from .shard import Fragment, Shard


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    # The fused kernel is one launch for all tensors (CUDA and CPU), and it can skip a step on a device-side flag.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)


class OptimizerStep(Protocol):
    model: torch.nn.Module  # what the task's loss runs (under ZeRO-3 its parameters are gathered by hooks)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's mean loss."""

    def step(self, lr: float) -> torch.Tensor:
        """Apply the accumulated gradients at this learning rate; returns the gradient norm before clipping
        (non-finite when the step was skipped)."""

    def shard(self) -> Shard:
        """This rank's fp32 slices of the trainable parameters and their AdamW moments."""


class LocalOptimizerStep:
    """One process: gradient accumulation, global-norm clipping, fused AdamW."""

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
        self.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def shard(self) -> Shard:
        optimizer = self.optimizer
        fragments = []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                fragments.append(Fragment(name, tuple(p.shape), 0, p.data.view(-1),
                                          lambda key, p=p: optimizer.state[p][key].view(-1)))
        tensors = [p for group in optimizer.param_groups for p in group["params"]]
        return Shard(fragments, optimizer, tensors)
