"""Activation memory measured, not estimated: one training step of the real model and loss on fake tensors.

The task's model, its frozen parts and its loss run forward and backward under FakeTensorMode (shapes, dtypes and
strides, no data, no weights: the model is built on the meta device and given fake storage), so a DiT-L/2 step
costs seconds on a CPU. `LiveBytes`, a TorchDispatchMode, sees every op's outputs; each output whose storage is new
(not one of the op's inputs': views and in-place ops allocate nothing) adds its storage's bytes, and a weakref
finalizer on that storage subtracts them when the last tensor using it dies. Autograd's saved tensors keep their
storages alive until the backward has used them, so the running peak is the step's real peak of activations,
gradients and temporaries, the way the caching allocator sees it (less its rounding to 512-byte blocks).

The trace runs the eager step on CPU dispatch (autocast bf16 for a bf16 run): the kernels choose the same saved
tensors as on a GPU up to the attention backend's small statistics; regional torch.compile can only save less.
"""
import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..common.noise import BatchNoise
from ..common.seeds import NOISE_STREAM, derive_seed


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still alive; each storage's life as (start, end)
    in op counts, so a caller can split the peak by what the storages turned out to be (e.g. gradients)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.clock = 0
        self.lives: dict[int, list] = {}  # id(storage) -> [bytes, start, end or None]
        self._alive: dict[int, list] = {}

    def _add(self, storage) -> None:
        key = id(storage)
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        life = [nbytes, self.clock, None]
        self._alive[key] = life
        self.lives[len(self.lives)] = life
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        life = self._alive.pop(key, None)
        if life is not None:
            life[2] = self.clock
            self.live -= life[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in inputs:
                    self._add(storage)
        return out

    def peak_excluding(self, excluded: list) -> int:
        """The running peak without the given lives (a sweep over the recorded starts and ends)."""
        skip = {id(life) for life in excluded}
        events = []
        for life in self.lives.values():
            if id(life) in skip:
                continue
            events.append((life[1], life[0]))
            if life[2] is not None:
                events.append((life[2], -life[0]))
        live = peak = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # frees before allocations at one clock tick
            live += delta
            peak = max(peak, live)
        return peak

    def life_of(self, tensor: torch.Tensor):
        life = self._alive.get(id(tensor.untyped_storage()))
        return life


@dataclass
class StepTrace:
    micro_batch: int
    peak_bytes: int  # activations, gradients (as they appear) and temporaries, at their running peak
    peak_without_grads_bytes: int  # the same without the parameter gradients (what ZeRO-2/3 keep elsewhere)
    grad_bytes: int  # the parameter gradients the backward produced


def _to_fake(module: torch.nn.Module, dtype=None) -> torch.nn.Module:
    """A meta-device module given fake CPU storage (call under the FakeTensorMode)."""
    if dtype is not None:
        with torch._subclasses.fake_tensor.unset_fake_temporarily():  # the meta module, before it has storage
            module = module.to(dtype)
    return module.to_empty(device="cpu")


def trace_step(task, make_batch, micro_batch: int, global_batch: int, bf16: bool, frozen=()) -> StepTrace:
    """One micro-step of `task` (built on the meta device; its frozen modules named in `frozen`, converted to
    bf16 when bf16 as the trainer does on a GPU): loss forward under autocast, backward; peak live bytes.
    make_batch(micro_batch) builds the batch the training set would yield (called under the fake mode)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        task.model = _to_fake(task.model)
        for name in frozen:
            setattr(task, name, _to_fake(getattr(task, name), torch.bfloat16 if bf16 else None))
        task.device = torch.device("cpu")
        task.model.train()
        tracker = LiveBytes()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with tracker:
            batch = make_batch(micro_batch)  # on a GPU the batch is copied to the device: it counts
            rng = BatchNoise(derive_seed(0, NOISE_STREAM, 0), global_batch, slice(0, micro_batch), "cpu")
            with autocast:
                loss, metrics = task.loss(task.model, batch, 10 ** 6, 10 ** 6, rng)  # past nesting's start
            loss.backward()
            del loss, metrics, rng, batch
        grads = [tracker.life_of(p.grad) for p in task.model.parameters() if p.grad is not None]
        grads = [g for g in grads if g is not None]
        return StepTrace(micro_batch, tracker.peak, tracker.peak_excluding(grads), sum(g[0] for g in grads))
