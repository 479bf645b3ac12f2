"""Seeded, resumable batch order, the same global batches on any number of ranks.

The order of epoch e is a permutation drawn from (seed, e), and every item's augmentation is drawn from
(seed, e, index), all through the one seed scheme of common/seeds.py. Global batch s of the epoch is
order[s*B : (s+1)*B]; it is cut into ranks x accumulation micro-batches of m items, and micro-step a of rank r
takes piece a*ranks + r. So the position (epoch, step) in a checkpoint fully determines what every rank reads
next, whatever the number of ranks, micro-batch or workers, and the global batches never depend on them.
A dataset with an `epoch_loader(batches, num_workers, pin_memory)` of its own (DALI, data/dali.py) is handed these
batches and iterates them itself; the trainer never knows which kind it has.
"""
import torch
from torch.utils.data import DataLoader, Dataset

from ..common.seeds import ITEM_STREAM, LOADER_STREAM, ORDER_STREAM, derive_seed, seeded_generator


class SeededItems(Dataset):
    """Map-style view whose keys are (index, seed): datasets with `get(index, generator)` get a seeded generator."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        get = getattr(self.dataset, "get", None)
        if get is None:
            return self.dataset[index]
        return get(index, torch.Generator().manual_seed(seed))


def piece(micro_step: int, rank: int, world_size: int, micro_batch: int) -> slice:
    """The rows of the global batch that micro-step `micro_step` of rank `rank` takes."""
    j = micro_step * world_size + rank
    return slice(j * micro_batch, (j + 1) * micro_batch)


def rank_batches(num_items: int, batch_size: int, micro_batch: int, world_size: int, rank: int, seed: int,
                 epoch: int, start_step: int = 0, shuffle: bool = True) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of epoch `epoch` from global step `start_step` on, as (index, item seed) lists."""
    if batch_size % (micro_batch * world_size):
        raise ValueError(f"a global batch of {batch_size} does not split into micro-batches of {micro_batch} "
                         f"on {world_size} ranks")
    accum = batch_size // (micro_batch * world_size)
    if shuffle:
        order = torch.randperm(num_items, generator=seeded_generator(seed, ORDER_STREAM, epoch)).tolist()
    else:
        order = list(range(num_items))
    out = []
    for step in range(start_step, steps_per_epoch(num_items, batch_size)):  # no ragged last batch
        batch = order[step * batch_size:(step + 1) * batch_size]
        for a in range(accum):
            out.append([(i, derive_seed(seed, ITEM_STREAM, epoch, i)) for i in batch[piece(a, rank, world_size, micro_batch)]])
    return out


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return num_items // batch_size


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, start_step: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, micro_batch: int = 0, world_size: int = 1, rank: int = 0) -> DataLoader:
    """This rank's micro-batches of one epoch from global step `start_step` on (micro_batch 0: the whole batch)."""
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}; "
                         f"lower train.batch_size or add data")
    if hasattr(dataset, "set_epoch"):  # epoch-dependent items (e.g. which cached view); workers copy it below
        dataset.set_epoch(epoch)
    batches = rank_batches(len(dataset), batch_size, micro_batch or batch_size, world_size, rank, seed, epoch,
                           start_step)
    own = getattr(dataset, "epoch_loader", None)
    if own is not None:  # a dataset with a pipeline of its own (data/dali.py) reads these same batches
        return own(batches, num_workers, pin_memory)
    return DataLoader(
        SeededItems(dataset), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False,
        # An explicit generator keeps the loader from consuming the global RNG, which the checkpoint restores.
        generator=seeded_generator(seed, LOADER_STREAM, epoch),
    )
