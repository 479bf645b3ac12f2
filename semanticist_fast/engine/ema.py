"""Exponential moving average of the trainable weights, updated once per optimizer step.

It averages exactly the fp32 slices this rank owns (engine/shard.py): the whole model on one process, the ZeRO
partition under DeepSpeed, so it costs 1/N of the model per rank and never gathers anything to update. Each
element's average is the same as on one process, so a run on N ranks saves the EMA a single process would.
"""
import torch

from .shard import Fragment


class EMA:
    """shadows: where the averages live (the parameters of a module copy on one process, so previews can run it;
    clones of the slices under ZeRO); they start equal to the weights and are paired with them once."""

    def __init__(self, fragments: list[Fragment], decay: float, shadows: list[torch.Tensor]):
        if len(shadows) != len(fragments):
            raise ValueError(f"{len(shadows)} EMA tensors for {len(fragments)} parameter slices")
        self.decay = decay
        self.fragments = fragments
        self._sources = [f.master for f in fragments]
        self.shadows = [s.view(-1) for s in shadows]
        with torch.no_grad():
            torch._foreach_copy_(self.shadows, self._sources)

    @classmethod
    def of_parameters(cls, model: torch.nn.Module, decay: float) -> "EMA":
        """The EMA of a module's trainable parameters, the averages in fresh tensors (for benchmarks; the trainer
        takes its slices from its engine)."""
        fragments = [Fragment(name, tuple(p.shape), 0, p.data.view(-1), None)
                     for name, p in model.named_parameters() if p.requires_grad]
        return cls(fragments, decay, [torch.empty_like(f.master) for f in fragments])

    @torch.no_grad()
    def update(self) -> None:
        # One fused foreach lerp over all slices: ema += (1 - decay) * (weights - ema).
        torch._foreach_lerp_(self.shadows, self._sources, 1.0 - self.decay)
