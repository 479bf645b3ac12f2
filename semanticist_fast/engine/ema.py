"""Exponential moving average of the trainable weights, updated once per optimizer step."""
import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = [p for p in self.model.parameters()]
        self._params = [p for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # One fused foreach lerp over all tensors: ema += (1 - decay) * (param - ema).
        torch._foreach_lerp_(self._ema_params, [p.detach() for p in self._params], 1.0 - self.decay)
        buffers = dict(model.named_buffers())
        for name, ema_buf in self.model.named_buffers():
            if name in buffers and buffers[name].shape == ema_buf.shape:
                ema_buf.copy_(buffers[name])

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
