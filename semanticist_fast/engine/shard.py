"""What one rank owns of the training state: a slice of every trainable parameter in full precision, and the AdamW
moments of that slice.

On one process the slice is the whole parameter. Under ZeRO it is the partition DeepSpeed assigned to the rank
(engine/zero.py builds those fragments). The EMA averages these slices (so under ZeRO it is partitioned like the
optimizer, and no rank ever gathers the model to update it), and checkpoints store them with their offsets, so a
checkpoint written by N ranks restores onto M ranks: each rank copies the pieces of the saved slices that overlap
its own.
"""
from dataclasses import dataclass
from typing import Callable

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per element; "step" is one count per tensor


@dataclass
class Fragment:
    name: str  # the parameter's name in the model's state dict
    shape: tuple[int, ...]  # the whole parameter's shape
    start: int  # where this slice begins in the flattened parameter
    master: torch.Tensor  # flat view of the fp32 weights the optimizer updates
    moment: Callable[[str], torch.Tensor]  # flat view of an AdamW moment of this slice (needs the state to exist)

    @property
    def numel(self) -> int:
        return self.master.numel()


class Shard:
    """fragments: this rank's slices; optimizer: the torch AdamW that updates them; state_tensors: the tensors that
    optimizer keeps its state for (the parameters, or ZeRO's flat partitions); publish: after the slices were
    written (a restore), makes the weights the model computes with equal them again (ZeRO keeps a working copy)."""

    def __init__(self, fragments: list[Fragment], optimizer: torch.optim.Optimizer, state_tensors: list[torch.Tensor],
                 publish: Callable[[], None] = lambda: None):
        self.fragments, self.optimizer, self.state_tensors = fragments, optimizer, state_tensors
        self.publish = publish

    def ensure_state(self) -> None:
        """Create AdamW's state as its first step would (zeros, step 0), so that a restore can fill it."""
        fused = any(group.get("fused") for group in self.optimizer.param_groups)
        for t in self.state_tensors:
            if t in self.optimizer.state and "exp_avg" in self.optimizer.state[t]:
                continue
            step = torch.zeros((), dtype=torch.float32, device=t.device if fused else "cpu")
            self.optimizer.state[t] = {"step": step, "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}

    def optimizer_steps(self) -> int:
        for t in self.state_tensors:
            state = self.optimizer.state.get(t)
            if state and "step" in state:
                return int(state["step"])
        return 0

    def set_optimizer_steps(self, steps: int) -> None:
        self.ensure_state()
        for t in self.state_tensors:
            self.optimizer.state[t]["step"].fill_(float(steps))


def copy_overlaps(target: torch.Tensor, target_start: int, pieces) -> int:
    """Fill the flat slice target (covering [target_start, target_start + numel) of a flattened parameter) from
    saved slices `pieces` of (start, flat tensor); returns how many elements were covered."""
    covered = 0
    end = target_start + target.numel()
    for start, values in pieces:
        lo, hi = max(start, target_start), min(start + values.numel(), end)
        if lo < hi:
            target[lo - target_start:hi - target_start].copy_(values[lo - start:hi - start])
            covered += hi - lo
    return covered
