"""Images written to disk: PNG grids, and sample archives (.npz) for later scoring."""
from pathlib import Path

import numpy as np
import torch

from ..common.files import atomic_write


def save_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> None:
    """rows: equal-shaped (N, 3, H, W) batches in [0, 1]; each becomes one row of the grid."""
    from PIL import Image

    rows = [r.detach().float().clamp(0, 1).cpu() for r in rows]
    n, _, h, w = rows[0].shape
    grid = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = row[j]
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    atomic_write(Path(path), lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_samples(images: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """images (N, 3, H, W) in [0, 1] and their labels as uint8 HWC images + int labels in one .npz."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8).numpy()
    atomic_write(Path(path), lambda f: np.savez(f, images=array, labels=labels.cpu().numpy()))


def token_counts(num_slots: int) -> list[int]:
    """1, 2, 4, ... up to and including num_slots."""
    counts, k = [], 1
    while k < num_slots:
        counts.append(k)
        k *= 2
    return counts + [num_slots]
