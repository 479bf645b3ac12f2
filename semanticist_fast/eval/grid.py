"""Image grids written as PNG."""
from pathlib import Path

import torch

from semanticist_fast.engine.checkpoint import atomic_write


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


def token_counts(num_slots: int) -> list[int]:
    """1, 2, 4, ... up to and including num_slots."""
    counts, k = [], 1
    while k < num_slots:
        counts.append(k)
        k *= 2
    return counts + [num_slots]
