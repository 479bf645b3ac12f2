"""Where the training losses draw their random numbers: one draw per sample, from a source the trainer chooses.

The diffusion times and noise, the nested-dropout keep counts, the dropped class labels, the VAE posterior sample
and the stochastic-depth masks are all drawn per sample, through a `SampleNoise`. The trainer passes a
`BatchNoise`: every draw is made for the whole global batch from a generator seeded by (seed, step) and this
micro-batch's rows are sliced out, so sample i of a global batch gets the same numbers whether one process takes
the whole batch or 64 ranks take eight samples each, with or without gradient accumulation. That is what makes a
run on N ranks equal one on a single process, and a run resumed at another world size equal the uninterrupted one.
Drawing the whole batch on every rank costs a few million random numbers per step: nothing beside the model.

Element-wise dropout inside transformer blocks (the GPT's resid/ffn dropout) stays on the process's own stream:
its masks are as large as the activations.

Without a source, `LocalNoise` draws from torch's global generator, as plain PyTorch code would.
"""
from typing import Optional, Protocol, Sequence, Union

import torch

Device = Union[str, torch.device]


class SampleNoise(Protocol):
    """Random draws whose first dimension is the micro-batch (one row per sample)."""

    def rand(self, *shape: int) -> torch.Tensor: ...

    def randn(self, *shape: int) -> torch.Tensor: ...

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor: ...


class LocalNoise:
    """Draws from torch's global generator on `device`."""

    def __init__(self, device: Device):
        self.device = torch.device(device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, device=self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, device=self.device)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, device=self.device)


class BatchNoise:
    """Draws for rows `rows` of a global batch of `batch_size` samples; every process draws the whole batch alike.

    The draws of one step must be made in the same order on every process (the same code path does that)."""

    def __init__(self, seed: int, batch_size: int, rows: slice, device: Device):
        self.device = torch.device(device)
        self.batch_size, self.rows = batch_size, rows
        self.num_rows = len(range(*rows.indices(batch_size)))
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def _full_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        if not shape or shape[0] != self.num_rows:
            raise ValueError(f"a per-sample draw must have the micro-batch ({self.num_rows}) as its first "
                             f"dimension, got shape {tuple(shape)}")
        return (self.batch_size, *shape[1:])

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(self._full_shape(shape), generator=self.generator, device=self.device)[self.rows]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(self._full_shape(shape), generator=self.generator, device=self.device)[self.rows]

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        full = torch.randint(low, high, self._full_shape(shape), generator=self.generator, device=self.device)
        return full[self.rows]


def noise_or_local(noise: Optional[SampleNoise], device: Device) -> SampleNoise:
    return LocalNoise(device) if noise is None else noise
