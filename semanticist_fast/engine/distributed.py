"""The processes of one training run: which rank this is, how many there are, and the few collectives the trainer
needs (a barrier, one metrics reduction per logging interval, small objects at checkpoints).

Ranks come from the launcher's environment (common/distributed.py). Every collective has a deadline
(train.collective_timeout_s): a rank whose peers died or hang reports it and exits instead of waiting forever.
"""
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..common.device import resolve_device
from ..common.distributed import ranks_from_env


class CollectiveError(RuntimeError):
    """Another rank died or stopped answering; the message says which call and the deadline."""


# How gloo and NCCL word a peer that vanished or a collective past its deadline.
_COMMUNICATION_MARKS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out",
                        "Timed out", "Socket Timeout")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0
    distributed: bool = False  # a process group is up (the deepspeed engine, even on one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def collective_error(self, error: BaseException, what: str) -> Optional[CollectiveError]:
        """The error a failed collective raised (ours or DeepSpeed's), as one that says what happened; None for
        an error of another kind."""
        import torch.distributed as dist

        text = str(error)
        if not self.distributed or not (isinstance(error, (dist.DistError, ConnectionError)) or
                                        any(mark in text for mark in _COMMUNICATION_MARKS)):
            return None
        return CollectiveError(f"rank {self.rank}: {what} failed: another rank died or did not answer within "
                               f"train.collective_timeout_s={self.timeout_s:g} s ({type(error).__name__}: "
                               f"{text.splitlines()[0] if text else ''})")

    def _guard(self, what: str, fn, *args):
        if not self.distributed:
            return None
        try:
            return fn(*args)
        except (RuntimeError, ConnectionError) as e:  # gloo and NCCL raise these (DistBackendError is one)
            failure = self.collective_error(e, what)
            if failure is None:
                raise
            raise failure from e

    def barrier(self, what: str = "barrier") -> None:
        import torch.distributed as dist
        self._guard(what, dist.barrier)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "metrics reduction") -> torch.Tensor:
        import torch.distributed as dist
        self._guard(what, dist.all_reduce, tensor)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor, what: str = "reduction") -> torch.Tensor:
        import torch.distributed as dist
        self._guard(what, dist.all_reduce, tensor, dist.ReduceOp.MIN)
        return tensor

    def all_gather_object(self, obj: Any, what: str = "gather") -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        self._guard(what, dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str = "broadcast") -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        self._guard(what, dist.broadcast_object_list, box, 0)
        return box[0]


def init_world(engine: str, device_name: str, timeout_s: float) -> World:
    """The world of this process. The single engine runs alone; the deepspeed engine starts the process group
    (NCCL on GPUs, gloo on CPUs), also for one rank, so that one code path serves every size."""
    ranks = ranks_from_env()
    rank, size, local_rank = ranks.rank, ranks.world_size, ranks.local_rank
    if engine == "single" and size > 1:
        raise ValueError(f"train.engine=single runs one process, but the launcher started {size}: set "
                         "train.engine=deepspeed to train data-parallel")
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    world = World(rank, size, local_rank, device, timeout_s)
    if engine == "deepspeed":
        # DeepSpeed's rendezvous (env://) reads RANK / WORLD_SIZE / LOCAL_RANK, which srun does not set (it sets
        # SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID): pass on the ranks found.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        if size == 1:  # started without a launcher: a one-rank group on this host
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"{size} ranks need a rendezvous address: set {' and '.join(missing)} (torchrun and the "
                             "deepspeed launcher set them; under srun, launch/slurm.sbatch sets them from the node "
                             "list)")
        import torch.distributed as dist
        if not dist.is_initialized():
            import deepspeed

            from .deepspeed_ops import build_deepspeed_ops
            build_deepspeed_ops(timeout_s)  # before DeepSpeed loads it: a stale JIT-build lock would hang it
            # The deadline is in the process group: every collective, DeepSpeed's own included, inherits it.
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s))
        world.distributed = True
    return world
