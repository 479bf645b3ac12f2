"""DeepSpeed ZeRO (stages 1, 2, 3) as the distributed engine: its config, its optimizer step, its state slices.

`deepspeed_config` is the one place that turns the run's YAML into DeepSpeed's config. Keys a user adds through
`--deepspeed-config FILE` join it; a key that both set is an error naming it (the YAML is the source of truth for
what it covers). Precision is not DeepSpeed's: weights and AdamW stay fp32 and `train.precision: bf16` runs the
forward and backward under torch's bf16 autocast, exactly as the single engine does, so the two engines compute
the same numbers (the frozen VAE and DINOv2 sit outside the engine, in bf16, on every rank).

The optimizer is ours (torch AdamW, fused, with our parameter groups); our schedule sets its learning rate each
step. DeepSpeed reduces the gradients, clips them to optim.grad_clip, skips a step whose norm is not finite, and
partitions the optimizer state (1), the gradients too (2), and the parameters too (3). The task runs through
`engine(...)`, so ZeRO-3's hooks gather each module's parameters around its forward.

`ZeroEngine` is the seam's DeepSpeed side (engine/engines.py): it starts the process group, and keeps the EMA of
each rank's partition beside it, so previews read the EMA from the checkpoint just written.
"""
import datetime
import os
import socket
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..common.distributed import World, world_from_env
from .train_config import OptimConfig, TrainConfig
from .ema import EMA
from .optimizer import build_adamw
from .shard import Fragment, Shard

# Settings the YAML owns; a --deepspeed-config that sets one of them is refused.
YAML_OWNED_TOP = ("bf16", "fp16", "amp", "optimizer", "scheduler")


def deepspeed_config(train: TrainConfig, optim: OptimConfig, world_size: int, extra: Optional[dict] = None,
                     source: str = "--deepspeed-config") -> dict:
    micro, accum = train.batch_plan(world_size)
    zero = train.zero
    z: dict[str, Any] = {"stage": train.zero_stage, "overlap_comm": zero.overlap_comm,
                         "contiguous_gradients": zero.contiguous_gradients,
                         "reduce_bucket_size": zero.reduce_bucket_size}
    if train.zero_stage < 3:
        z["allgather_bucket_size"] = zero.allgather_bucket_size
    else:
        z["stage3_prefetch_bucket_size"] = zero.prefetch_bucket_size
        z["stage3_param_persistence_threshold"] = zero.param_persistence_threshold
    if zero.offload_optimizer == "cpu":
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": z,
        "zero_allow_untested_optimizer": True,  # torch's AdamW is a client optimizer to DeepSpeed
        "steps_per_print": 2 ** 62,  # our trainer logs
        "wall_clock_breakdown": False,
    }
    if extra:
        for key in YAML_OWNED_TOP:
            if key in extra:
                raise ValueError(f"{source} sets {key!r}, which the run's YAML owns (train.precision, optim.*, "
                                 "the lr schedule): remove it from the file")
        config = _merge_disjoint(config, extra, source)
    return config


def _merge_disjoint(ours: dict, theirs: dict, source: str, prefix: str = "") -> dict:
    out = dict(ours)
    for key, value in theirs.items():
        path = f"{prefix}{key}"
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_disjoint(out[key], value, source, path + ".")
        elif key in out:
            raise ValueError(f"{path} is set both by the run's YAML (as {out[key]!r}) and by {source} (as "
                             f"{value!r}): set it in one place only")
        else:
            out[key] = value
    return out


class LossModule(nn.Module):
    """What DeepSpeed wraps: the trainable model as its one child, and the task's loss as its forward."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, *args):
        return self._loss_fn(self.model, *args)


class DeepSpeedOptimizerStep:
    def __init__(self, model: nn.Module, loss_fn, train: TrainConfig, optim: OptimConfig, lr: float,
                 world_size: int, device: torch.device, extra_config: Optional[dict] = None):
        import deepspeed

        if train.zero_stage == 3 and any(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl is not None
                                         for m in model.modules()):
            raise ValueError("runtime.compile=true does not work with train.zero_stage=3 (ZeRO-3's parameter hooks "
                             "break the compiled blocks' graphs): use zero_stage 1 or 2, or runtime.compile=false")
        self.train, self.accum = train, train.batch_plan(world_size)[1]
        self.config = deepspeed_config(train, optim, world_size, extra_config)
        self.wrapper = LossModule(model, loss_fn)
        adamw = build_adamw(model, lr, optim.betas, optim.weight_decay)
        self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(model=self.wrapper, optimizer=adamw,
                                                                      config=self.config)
        self.model, self.device = model, device
        self._micro = 0
        self._shard: Optional[Shard] = None

    def loss(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        # Whether this is the last micro-batch of the step decides whether DeepSpeed reduces the gradients now;
        # saying so here lets `step` be DeepSpeed's one step call (its own count would need a call per backward).
        self._micro += 1
        self.engine.set_gradient_accumulation_boundary(self._micro == self.accum)
        self.engine.backward(loss)

    def step(self, lr: float) -> torch.Tensor:
        self._micro = 0
        for group in self.zero_optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        # The norm carries the skip: DeepSpeed stores float("inf") when it skipped the step and the device tensor
        # of the norm otherwise, so the trainer's on-device non-finite flag sees both without a host sync here
        # (reading zero_optimizer.overflow or float(norm) would not be free on every path).
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm is false): "
                               "remove that setting from --deepspeed-config; the trainer logs the norm")
        if torch.is_tensor(norm):
            return norm.to(torch.float32)  # a no-op for DeepSpeed's fp32 norm: no copy, no sync
        return torch.tensor(float(norm), dtype=torch.float32, device=self.device)  # a skipped step: inf

    def shard(self) -> Shard:
        if self._shard is None:
            self._shard = zero3_shard(self.model, self.zero_optimizer) if self.train.zero_stage == 3 \
                else zero12_shard(self.model, self.zero_optimizer)
        return self._shard


class ZeroEngine:
    """DeepSpeed ZeRO over the launched ranks (engine/engines.py has the seam): the task's loss runs through
    DeepSpeed's engine, the EMA of this rank's partition lives in clones of its fp32 slices."""

    @staticmethod
    def start_world(device_name: str, timeout_s: float) -> World:
        """DeepSpeed's process group (NCCL on GPUs, gloo on CPUs), also for one rank, so that one code path serves
        every size."""
        world = world_from_env(device_name, timeout_s)
        # DeepSpeed's rendezvous (env://) reads RANK / WORLD_SIZE / LOCAL_RANK, which srun does not set (it sets
        # SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID): pass on the ranks found.
        os.environ.setdefault("RANK", str(world.rank))
        os.environ.setdefault("WORLD_SIZE", str(world.size))
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        if world.size == 1:  # started without a launcher: a one-rank group on this host
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"{world.size} ranks need a rendezvous address: set {' and '.join(missing)} (torchrun "
                             "and the deepspeed launcher set them; under srun, launch/slurm.sbatch sets them from the "
                             "node list)")
        import torch.distributed as dist
        if not dist.is_initialized():
            import deepspeed

            from .deepspeed_ops import build_deepspeed_ops
            build_deepspeed_ops(timeout_s)  # before DeepSpeed loads it: a stale JIT-build lock would hang it
            # The deadline is in the process group: every collective, DeepSpeed's own included, inherits it.
            deepspeed.init_distributed(dist_backend="nccl" if world.device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s))
        world.distributed = True
        return world

    def __init__(self, task, train: TrainConfig, optim: OptimConfig, lr: float, world: World,
                 deepspeed_config: Optional[dict] = None):
        self.model, self.device, self.zero_stage = task.model, world.device, train.zero_stage
        self._new_model = task.new_model
        self.optimizer_step = DeepSpeedOptimizerStep(self.model, task.loss, train, optim, lr, world.size,
                                                     world.device, deepspeed_config)
        self.loss = self.optimizer_step.loss
        self.backward = self.optimizer_step.backward
        self.shard = self.optimizer_step.shard()
        self.ema = EMA(self.shard.fragments, train.ema_decay, [f.master.detach().clone() for f in self.shard.fragments])

    def step(self, lr: float) -> torch.Tensor:
        grad_norm = self.optimizer_step.step(lr)
        self.ema.update()
        return grad_norm

    def ema_model(self, checkpoint: Optional[Path]) -> Optional[nn.Module]:
        """A fresh model with the EMA the checkpoint just written holds whole (no rank holds it whole otherwise)."""
        if checkpoint is None:
            return None
        from safetensors.torch import load_file

        model = self._new_model().to(self.device)
        model.load_state_dict(load_file(str(checkpoint / "ema.safetensors"), device=str(self.device)))
        return model.eval()

    def checkpoint_meta(self) -> dict:
        return {"engine": "deepspeed", "zero_stage": self.zero_stage}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero12_shard(model: nn.Module, zero_optimizer) -> Shard:
    """ZeRO-1/2: each rank's fp32 partition is a contiguous run of the flattened parameter group; a parameter's
    piece of it is DeepSpeed's tensor fragment (absent when another rank holds all of it)."""
    inner = zero_optimizer.optimizer
    flats = [group["params"][0] for group in inner.param_groups]
    fragments = []
    for name, p in model.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if not p.requires_grad or mapping is None:
            continue
        flat = flats[mapping.param_group_index]
        at, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        fragments.append(Fragment(name, tuple(p.shape), mapping.lp_fragment_address.start, mapping.hp_fragment,
                                  lambda key, flat=flat, at=at, numel=numel: inner.state[flat][key].narrow(0, at, numel)))
    # Collective: every rank copies its fp32 partition into the working weights, then they are all-gathered.
    return Shard(fragments, inner, flats, publish=zero_optimizer.update_lp_params)


def zero3_shard(model: nn.Module, zero_optimizer) -> Shard:
    """ZeRO-3: every parameter is split in equal parts (padded at the end); rank r holds part r."""
    import torch.distributed as dist

    rank = dist.get_rank()
    inner = zero_optimizer.optimizer
    flats, fragments = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = p.ds_tensor.ds_numel
        start = rank * part
        valid = max(0, min(part, p.ds_numel - start))
        view, group = zero_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False)
        flat = zero_optimizer.fp32_partitioned_groups_flat[group]
        if all(flat is not f for f in flats):
            flats.append(flat)
        if valid == 0:
            continue
        fragments.append(Fragment(
            name, tuple(p.ds_shape), start, view[:valid],
            lambda key, p=p, valid=valid: zero_optimizer._get_fp32_opt_state_partition(
                p, release_swap_buffers=False, optim_state_key=key)[0][:valid]))

    def publish():
        for group in range(len(zero_optimizer.fp32_partitioned_groups_flat)):
            zero_optimizer._reassign_or_swap_out_partitioned_parameters(group)

    return Shard(fragments, inner, flats, publish)
