"""The engine seam: what differs between training on one process and under DeepSpeed ZeRO, behind one interface.

The trainer drives an `Engine` and never asks which one it has. An engine starts the world it runs in, runs the
task's loss on its model, accumulates and applies the gradients (through its optimizer step, engine/optimizer.py),
keeps the EMA of the weights where it fits that engine, and hands the EMA to previews:
- `SingleEngine`: one process. The averages live in a copy of the model, so a preview runs it at any step.
- `engine.zero.ZeroEngine`: DeepSpeed ZeRO over the launched ranks. The averages live beside each rank's fp32
  partition; the whole EMA model exists only in the checkpoint just written, so previews wait for one.
Checkpoints read either through `shard` and `ema` (engine/checkpoint.py), the same for both.
"""
import copy
from functools import partial
from pathlib import Path
from typing import Optional, Protocol

import torch

from ..common.distributed import World, world_from_env
from .train_config import OptimConfig, TrainConfig
from .ema import EMA
from .optimizer import LocalOptimizerStep
from .shard import Shard
from .zero import ZeroEngine


class Engine(Protocol):
    model: torch.nn.Module  # the trainable model
    shard: Shard  # this rank's fp32 slices of it and their AdamW moments
    ema: EMA  # the averages of those slices

    def loss(self, batch, step: int, epoch: int, rng) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's loss of one micro-batch, run on the model as this engine runs it."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's mean loss."""

    def step(self, lr: float) -> torch.Tensor:
        """Apply the accumulated gradients at this learning rate and move the EMA; returns the gradient norm
        before clipping (non-finite when the step was skipped)."""

    def ema_model(self, checkpoint: Optional[Path]) -> Optional[torch.nn.Module]:
        """The EMA weights as a model in eval mode, for a preview on rank 0; `checkpoint` is the one written at
        this step, if any. None when this engine cannot give them now."""

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records of the engine that wrote it."""


class SingleEngine:
    """One process: the task's loss on the model as it is, LocalOptimizerStep, the EMA in a copy of the model."""

    @staticmethod
    def start_world(device_name: str, timeout_s: float) -> World:
        world = world_from_env(device_name, timeout_s)
        if world.size > 1:
            raise ValueError(f"train.engine=single runs one process, but the launcher started {world.size}: set "
                             "train.engine=deepspeed to train data-parallel")
        return world

    def __init__(self, task, train: TrainConfig, optim: OptimConfig, lr: float, world: World,
                 deepspeed_config: Optional[dict] = None):
        if deepspeed_config is not None:
            raise ValueError("a DeepSpeed config is given but train.engine is 'single': set train.engine=deepspeed")
        self.model = task.model
        self.optimizer_step = LocalOptimizerStep(self.model, lr, optim.betas, optim.weight_decay, optim.grad_clip,
                                                 train.batch_plan(world.size)[1])
        self.loss = partial(task.loss, self.model)
        self.backward = self.optimizer_step.backward
        self.shard = self.optimizer_step.shard()
        # The averages are the parameters of a copy of the model, so that previews run it as it is.
        self._ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        ema_params = dict(self._ema_model.named_parameters())
        self.ema = EMA(self.shard.fragments, train.ema_decay, [ema_params[f.name] for f in self.shard.fragments])

    def step(self, lr: float) -> torch.Tensor:
        grad_norm = self.optimizer_step.step(lr)
        self.ema.update()
        return grad_norm

    @torch.no_grad()
    def ema_model(self, checkpoint: Optional[Path]) -> torch.nn.Module:
        for mine, theirs in zip(self._ema_model.buffers(), self.model.buffers()):  # buffers (norm statistics)
            mine.copy_(theirs)                                                    # are not averaged
        return self._ema_model

    def checkpoint_meta(self) -> dict:
        return {"engine": "single", "zero_stage": None}


# train.engine -> the engine that runs it.
ENGINES = {"single": SingleEngine, "deepspeed": ZeroEngine}


def init_world(engine: str, device_name: str, timeout_s: float) -> World:
    """The world of this process, as the engine `engine` (train.engine) runs it."""
    return ENGINES[engine].start_world(device_name, timeout_s)


def build_engine(task, train: TrainConfig, optim: OptimConfig, lr: float, world: World,
                 deepspeed_config: Optional[dict] = None) -> Engine:
    return ENGINES[train.engine](task, train, optim, lr, world, deepspeed_config)
