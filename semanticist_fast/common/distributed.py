"""The processes of one run: which rank this is, how many there are, the few collectives they need, and the end of
their process group.

Ranks come from the launcher's environment: RANK, WORLD_SIZE, LOCAL_RANK (torchrun, the deepspeed launcher), or
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID under srun; a plain `python` run is rank 0 of 1.

`World` holds the collectives (a barrier, the metric reductions, small objects). Each has a deadline: a rank whose
peers died or hang reports it and exits instead of waiting forever. Training's engine starts the process group
(engine/engines.py: none for one process, DeepSpeed's for ZeRO); a world of several ranks without one (the
evaluations, which meet once at the end) starts a gloo group, which needs no GPU, at its first collective.
`close` ends the group; the entry points call it in a `finally`.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .device import resolve_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether work item `index` is this rank's: every world_size-th one, starting at its rank."""
        return index % self.world_size == self.rank

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; other devices are shared as given."""
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device


def ranks_from_env() -> Ranks:
    def read(names: tuple[str, ...], default: int) -> int:
        name = next((n for n in names if os.environ.get(n, "") != ""), None)
        if name is None:
            return default
        try:
            return int(os.environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None

    world = read(("WORLD_SIZE", "SLURM_NTASKS"), 1)
    rank = read(("RANK", "SLURM_PROCID"), 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} from the environment are inconsistent")
    return Ranks(rank, world, read(("LOCAL_RANK", "SLURM_LOCALID"), rank))


class CollectiveError(RuntimeError):
    """Another rank died or stopped answering; the message says which call and the deadline."""


# How gloo and NCCL word a peer that vanished or a collective past its deadline.
_COMMUNICATION_MARKS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out",
                        "Timed out", "Socket Timeout")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0
    distributed: bool = False  # a process group is up (the deepspeed engine's, even on one rank, or gloo's)
    timeout_key: Optional[str] = "train.collective_timeout_s"  # the setting behind timeout_s, named in errors

    @classmethod
    def of(cls, ranks: Ranks, timeout_s: float) -> "World":
        """The world of the launcher's ranks, no group started yet, on a fixed deadline."""
        return cls(ranks.rank, ranks.world_size, ranks.local_rank, timeout_s=timeout_s, timeout_key=None)

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
        deadline = f"{self.timeout_key}={self.timeout_s:g} s" if self.timeout_key else f"{self.timeout_s:g} s"
        return CollectiveError(f"rank {self.rank}: {what} failed: another rank died or did not answer within "
                               f"{deadline} ({type(error).__name__}: "
                               f"{text.splitlines()[0] if text else ''})")

    def _guard(self, what: str, fn, *args):
        if not self.distributed:
            if self.size == 1:
                return None
            self._start_gloo(what)
        try:
            return fn(*args)
        except (RuntimeError, ConnectionError) as e:  # gloo and NCCL raise these (DistBackendError is one)
            failure = self.collective_error(e, what)
            if failure is None:
                raise
            raise failure from e

    def _start_gloo(self, what: str) -> None:
        """The group of a world no engine started, from the launcher's MASTER_ADDR / MASTER_PORT; the first
        collective waits in it for the other ranks (up to the deadline)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo", rank=self.rank, world_size=self.size,
                                        timeout=datetime.timedelta(seconds=self.timeout_s))
            except (RuntimeError, ConnectionError) as e:
                self.distributed = True  # so that the error is read as a failed collective
                failure = self.collective_error(e, what)
                if failure is None:
                    raise
                raise failure from e
        self.distributed = True

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank gets here (a no-op alone)."""
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
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        self._guard(what, dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str = "broadcast") -> Any:
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        self._guard(what, dist.broadcast_object_list, box, 0)
        return box[0]


def world_from_env(device_name: str, timeout_s: float) -> World:
    """This process's world as its launcher started it, on its device (a GPU named without an index: the one of
    its local rank); no group yet: the training engine starts one if it needs it."""
    ranks = ranks_from_env()
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return World(ranks.rank, ranks.world_size, ranks.local_rank, device, timeout_s)


def close() -> None:
    """End this process's group, if one is up. The backend's threads are joined now rather than at interpreter
    exit, where a still-joinable one aborts a process that has finished ("terminate called without an active
    exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
