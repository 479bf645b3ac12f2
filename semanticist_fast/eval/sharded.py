"""The sample store both evaluations share: shards made once, resumable, split across ranks.

Shard s holds items [s * shard_size, (s + 1) * shard_size) and is made as one batch whose randomness is seeded by
(seed, s) alone, so its content does not depend on which rank made it, on how many ranks there were, or on whether
the run was interrupted. Shard s belongs to rank s mod world_size; each rank makes the shards of its own that are
done (data/shards.py writes them atomically, then a record per shard), then all meet at a barrier and rank 0
computes the metrics. A killed run, launched again with the same settings (any number of ranks), makes only the
shards that are missing; different settings are refused with the differing fields named.
"""
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..common.distributed import Ranks, World
from ..data.shards import ShardWriter, open_shards

log = logging.getLogger(__name__)

# The ranks meet once, after making their shards: a slow rank may keep the others waiting for hours.
_MEETING_DEADLINE_S = 24 * 3600

MakeShard = Callable[[int, range], dict]  # (shard, item indices) -> {name: array with one row per item}


def run_shards(directory: Path, identity: dict, names: tuple[str, ...], make_shard: MakeShard, ranks: Ranks,
               progress: bool = True, what: str = "samples") -> bool:
    """Make this rank's missing shards (each the arrays `names`, one row per item); True on rank 0 once every rank
    is done and every shard is on disk, False on the other ranks. identity must hold num_items and shard_size;
    each of its fields must match a store already in `directory`."""
    writer = ShardWriter(directory, identity, tuple(identity), what=f"{what} store")
    mine = writer.missing(ranks.rank, ranks.world_size)
    total = sum(writer.shard_len(s) for s in mine)
    bar = None
    if progress and ranks.is_main and mine:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=what if ranks.world_size == 1 else f"{what} (rank 0 of {ranks.world_size})",
                   unit="img", dynamic_ncols=True)
    start = time.perf_counter()
    for shard in mine:
        first, n = shard * writer.shard_size, writer.shard_len(shard)
        arrays = make_shard(shard, range(first, first + n))
        wrong = [name for name in names if name not in arrays or len(arrays[name]) != n]
        if wrong or set(arrays) != set(names):
            raise ValueError(f"shard {shard}: arrays {sorted(arrays)} for {n} items, expected {list(names)} "
                             f"with one row per item")
        writer.write(shard, **{name: arrays[name] for name in names})
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    if mine:
        seconds = time.perf_counter() - start
        log.info("rank %d: %d %s in %d shards, %.1f s (%.2f/s)", ranks.rank, total, what, len(mine), seconds,
                 total / seconds)
    World.of(ranks, _MEETING_DEADLINE_S).barrier(f"waiting for every rank's {what}")
    if not ranks.is_main:
        return False
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"{directory}: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} are missing "
                           f"after every rank finished (a rank failed?); run the same command again to make them")
    return True


def default_out_dir(checkpoint: Path, kind: str) -> Path:
    """RUN/eval/<checkpoint name>/<kind> for RUN/checkpoints/ckpt-N; beside any other checkpoint file."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "eval" / checkpoint.stem / kind


def load_arrays(directory: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{name: the rows of every shard, concatenated} of a complete store (for the small per-item arrays)."""
    _, arrays = open_shards(directory, names, what="samples store")
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


def shard_chunks(directory: Path, name: str):
    """One array's shards in order, memory-mapped: for writing them out without loading them all at once."""
    _, arrays = open_shards(directory, (name,), what="samples store")
    yield from arrays[name]
