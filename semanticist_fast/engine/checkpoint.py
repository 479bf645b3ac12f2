"""What a training checkpoint holds, written atomically into the run directory (common/runs.py) and pruned.

A checkpoint is one dict: kind, the run config, model and EMA weights, the optimizer state, the RNG states and
the data position (step, epoch, batch in epoch). The EMA weights are what inference loads.
"""
from pathlib import Path

from ..common.files import atomic_torch_save
from ..common.runs import checkpoint_path, list_checkpoints


def save_checkpoint(state: dict, out_dir: Path, keep: int) -> Path:
    path = checkpoint_path(out_dir, state["step"])
    atomic_torch_save(state, path)
    prune_checkpoints(out_dir, keep)
    return path


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
