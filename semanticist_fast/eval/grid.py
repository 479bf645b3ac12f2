"""Images written to disk: PNG grids, and sample archives (.npz) for later scoring, ours and the ADM evaluator's."""
import io
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..common.files import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, 3, H, W) on the CPU, rounded as a PNG writer would."""
    return (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)


def from_nhwc(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3), as the .npz archives hold images -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(array)).permute(0, 3, 1, 2).float() / 255


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
    array = to_uint8(grid[None])[0].permute(1, 2, 0).numpy()
    atomic_write(Path(path), lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_samples(images: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    """images (N, 3, H, W) in [0, 1] and their labels as uint8 HWC images + int labels in one .npz."""
    array = to_uint8(images).permute(0, 2, 3, 1).numpy()
    atomic_write(Path(path), lambda f: np.savez(f, images=array, labels=labels.cpu().numpy()))


def save_adm_npz(path: Path, image_chunks: Iterable[np.ndarray], labels: np.ndarray) -> None:
    """The ADM evaluator's sample batch: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels (N,), as np.savez writes
    it, streamed chunk by chunk so that 50,000 images need not fit in memory at once."""
    chunks = iter(image_chunks)
    first = next(chunks)
    count = int(labels.shape[0])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (count, *first.shape[1:])}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                written = 0
                for chunk in (first, *chunks):
                    if chunk.dtype != np.uint8 or chunk.shape[1:] != first.shape[1:]:
                        raise ValueError(f"image chunk {chunk.dtype} {chunk.shape} differs from the first, "
                                         f"uint8 {first.shape}")
                    member.write(np.ascontiguousarray(chunk).tobytes())
                    written += chunk.shape[0]
                if written != count:
                    raise ValueError(f"{written} images for {count} labels")
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(labels, dtype=np.int64))
            archive.writestr("arr_1.npy", buffer.getvalue())

    atomic_write(Path(path), write)


def token_counts(num_slots: int) -> list[int]:
    """1, 2, 4, ... up to and including num_slots."""
    counts, k = [], 1
    while k < num_slots:
        counts.append(k)
        k *= 2
    return counts + [num_slots]
