"""The run directory on disk: `RUN/checkpoints/ckpt-XXXXXXXX.pt`, newest = highest step.

Training writes it (engine/checkpoint.py); inference, evaluation and the CLI read it through here, so the layout
has one definition and readers need no training code.
"""
import re
from pathlib import Path
from typing import Optional

import torch

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"ckpt-{step:08d}.pt"


def list_checkpoints(out_dir: Path) -> list[Path]:
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoints found under {path}/checkpoints (expected ckpt-XXXXXXXX.pt files)")
        path = latest
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """mmap=True reads a tensor only when it is used: cheap config peeks and weight-only loads of checkpoints that
    also hold the optimizer moments. Only for reading: the tensors stay backed by the file."""
    # Our checkpoints hold only tensors, numbers, strings and RNG states, so the safe loader suffices.
    return torch.load(resolve_checkpoint(path), map_location=map_location, weights_only=True, mmap=mmap)


def saved_config(path) -> dict:
    """The run config stored in a checkpoint (a file or a run directory), without reading its tensors."""
    return load_checkpoint(path, mmap=True)["config"]
