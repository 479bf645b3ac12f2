"""Exponential moving average of the trainable weights, updated once per optimizer step."""
import copy

import torch


class EMA:
    """Tracks the model it was built from: its parameters are averaged, its buffers (norm statistics) copied.
    The tensors are paired once here; the model must update them in place (optimizers and load_state_dict do)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = list(self.model.parameters())
        self._params = list(model.parameters())
        self._ema_buffers, self._buffers = list(self.model.buffers()), list(model.buffers())  # a deep copy: same order

    @torch.no_grad()
    def update(self) -> None:
        # One fused foreach lerp over all parameters: ema += (1 - decay) * (param - ema); one foreach copy of buffers.
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.decay)
        if self._buffers:
            torch._foreach_copy_(self._ema_buffers, self._buffers)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
