"""The process's place among its peers, as the launcher sets it in the environment: RANK, WORLD_SIZE, LOCAL_RANK
(torchrun, the deepspeed launcher), or SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID under srun; a plain `python` run
is rank 0 of 1. Training's process group and its collectives are engine/distributed.py's.

Work is split by rank without communication; `barrier` is the one collective, over gloo (which needs no GPU and
works beside NCCL), so that one rank can finish what all of them wrote.
"""
import datetime
import os
from dataclasses import dataclass

import torch


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


def barrier(ranks: Ranks, timeout_s: float = 24 * 3600) -> None:
    """Wait until every rank gets here (a no-op alone). The process group is created on first use, from the
    launcher's MASTER_ADDR / MASTER_PORT, and kept for later barriers."""
    if ranks.world_size == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    dist.barrier()


def close(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
