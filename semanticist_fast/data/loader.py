"""Seeded, resumable batch order.

The order of epoch e is a permutation drawn from (seed, e), and every item's augmentation is drawn from
(seed, e, index), all through the one seed scheme of common/seeds.py. So the position (epoch, batch) in a
checkpoint fully determines the next batches: a resumed run sees exactly the batches of an uninterrupted one,
whatever the number of workers.
"""
import torch
from torch.utils.data import DataLoader, Dataset

from ..common.seeds import derive_seed, seeded_generator

# Streams of the seed scheme, so the order, the augmentations and the loader never share a seed.
_ORDER, _ITEM, _LOADER = 1, 2, 3


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


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[tuple[int, int]]]:
    if shuffle:
        order = torch.randperm(num_items, generator=seeded_generator(seed, _ORDER, epoch)).tolist()
    else:
        order = list(range(num_items))
    usable = steps_per_epoch(num_items, batch_size) * batch_size  # no ragged last batch: every step is full
    return [[(i, derive_seed(seed, _ITEM, epoch, i)) for i in order[b:b + batch_size]]
            for b in range(0, usable, batch_size)]


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return num_items // batch_size


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, start_batch: int = 0, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """The batches of one epoch from `start_batch` on."""
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}; "
                         f"lower train.batch_size or add data")
    if hasattr(dataset, "set_epoch"):  # epoch-dependent items (e.g. which cached view); workers copy it below
        dataset.set_epoch(epoch)
    batches = epoch_batches(len(dataset), batch_size, seed, epoch)[start_batch:]
    return DataLoader(
        SeededItems(dataset), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False,
        # An explicit generator keeps the loader from consuming the global RNG, which the checkpoint restores.
        generator=seeded_generator(seed, _LOADER, epoch),
    )
