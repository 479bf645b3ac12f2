"""Nested dropout over slot tokens: the mechanism that orders tokens like principal components."""
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..common.noise import SampleNoise, noise_or_local


@dataclass
class NestedDropoutConfig:
    enabled: bool = True
    enable_nest_after: int = 50  # nesting starts after this many epochs (or steps, see unit)
    unit: Literal["epoch", "step"] = "epoch"
    full_drop_prob: float = 0.1  # the whole condition goes null with this probability, before AND during nesting

    def validate(self):
        if not 0.0 <= self.full_drop_prob < 1.0:
            raise ValueError(f"nested.full_drop_prob must be in [0, 1), got {self.full_drop_prob}")


class NestedDropout:
    """Draws how many leading slots each sample keeps; the DiT puts its learned null vectors in the dropped
    positions (SlotDiT.forward's keep, the same path that decodes from the first k tokens).

    Before nesting starts all slots are kept. With probability full_drop_prob a sample keeps none, which trains the
    all-null (unconditional) branch used by decoder CFG. The reference stopped doing this once nesting began, so
    its unconditional branch went stale; we keep it on.
    """

    def __init__(self, cfg: NestedDropoutConfig, num_slots: int):
        self.cfg = cfg
        self.num_slots = num_slots

    def nesting_active(self, step: int, epoch: int) -> bool:
        progress = epoch if self.cfg.unit == "epoch" else step
        return self.cfg.enabled and progress >= self.cfg.enable_nest_after

    def sample_keep(self, batch: int, step: int, epoch: int, device, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        K = self.num_slots
        rng = noise_or_local(rng, device)
        # Both draws are made in every phase, so the stream a sample sees does not depend on when nesting starts.
        drawn = rng.randint(1, K + 1, batch)
        keep = drawn if self.nesting_active(step, epoch) else torch.full_like(drawn, K)
        full_drop = rng.rand(batch) < self.cfg.full_drop_prob
        return torch.where(full_drop, torch.zeros_like(keep), keep)
