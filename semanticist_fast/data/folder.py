"""ImageFolder dataset (root/<class_name>/**/<image>) that survives unreadable files.

A large crawl always holds a few truncated or mislabelled files; crashing a multi-day run on one
of them is worse than substituting a neighbour. An unreadable file is logged (warning, with its
path) and replaced, deterministically, by the next readable item in sorted order; the trainer reports
how many were skipped at the end of each epoch. A class folder without images is an error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..common.seeds import seeded_generator
from .transforms import to_rgb, to_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jpe")
_LAYOUT = "root/<class_name>/<image file> (subfolders allowed), one folder per class"

Transform = Callable[[Image.Image, torch.Generator], torch.Tensor]
# What PIL raises on a file it cannot decode (truncated, not an image, a decompression bomb).
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder tree: its visible subfolders, sorted (label i is the i-th)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolderDataset(Dataset):
    """(image, label) pairs from an ImageFolder tree; label = index of the class folder in sorted order.

    transform(pil_rgb, generator) -> float tensor, e.g. from transforms.build_transform; None gives the
    full image as a (3, H, W) tensor in [0, 1]. The generator of item i is seeded from
    (seed, epoch, i), so augmentations are reproducible and change with `set_epoch`.

    `num_skipped` counts the distinct unreadable files met so far, by this process and its DataLoader
    workers (one flag per file in shared memory, which forked workers inherit). Every skip is also
    logged (once per file per process) at warning level with its path.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, seed: int = 0):
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(
                f"dataset root '{root_path}' does not exist or is not a directory; expected {_LAYOUT}"
            )
        self.root = str(root_path)
        self.classes = class_folders(root_path)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            paths = []
            for dirpath, dirnames, filenames in os.walk(root_path / name, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                paths.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f) and not f.startswith("."))
            if not paths:
                raise FileNotFoundError(f"class folder '{root_path / name}' holds no images (extensions "
                                        f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder, or every "
                                        "label after it shifts")
            self.samples.extend((p, self.class_to_idx[name]) for p in sorted(paths))
        if not self.samples:
            raise FileNotFoundError(
                f"no images found under '{root_path}' (class folders found: {len(self.classes)}); expected {_LAYOUT} "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._skipped = multiprocessing.Array("b", len(self.samples), lock=False)
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        return int(np.frombuffer(self._skipped, dtype=np.int8).sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> Image.Image | None:
        if index in self._unreadable:
            return None
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return to_rgb(img)  # converting forces a full decode, so truncation fails here
        except UNREADABLE_ERRORS as e:
            self._unreadable.add(index)
            self._skipped[index] = 1
            logger.warning("skipping unreadable image %s (%s: %s); %d skipped so far", path, type(e).__name__, e,
                           self.num_skipped)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.get(index, seeded_generator(self.seed, self.epoch, index))

    def load(self, index: int) -> tuple[int, Image.Image]:
        """(j, image j as RGB): j is `index`, or the next readable file in sorted order when it is unreadable."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            j = (index + step) % n
            pil = self._load(j)
            if pil is not None:
                return j, pil
        raise RuntimeError(f"no readable image under '{self.root}': all {n} files failed to load")

    def get(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Item `index` with its augmentation drawn from `generator` (the trainer's resumable loader seeds it)."""
        j, pil = self.load(index)
        if self.transform is None:
            x = to_tensor(pil)
        else:
            x = self.transform(pil, generator)
        return x, self.samples[j][1]
