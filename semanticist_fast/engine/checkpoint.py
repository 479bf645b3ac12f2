"""Crash-safe checkpoint files: write to a temporary file in the same directory, fsync, then rename."""
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file beside path, fsync, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


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


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


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


def load_model_state(model: torch.nn.Module, state: dict, what: str = "checkpoint") -> None:
    """Strict load with an error that names the mismatched keys and shapes, not a wall of text."""
    check_state_fits(model, state, what)
    model.load_state_dict(state, strict=True)


def check_state_fits(model: torch.nn.Module, state: dict, what: str = "checkpoint") -> None:
    """Raise a ValueError naming every missing, unexpected and wrongly shaped key of `state` for `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"the {what} does not fit this model (was it made with a different config?)"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))
