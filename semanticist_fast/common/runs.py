"""The run directory on disk, read side: checkpoints, their integrity, and the weights inference loads.

    RUN/config.yaml, RUN/metrics.jsonl, RUN/.lock (common/lock.py)
    RUN/checkpoints/ckpt-00001000/        one checkpoint, complete or absent: written under a temporary name and
                                          renamed (engine/checkpoint.py)
        meta.json                         step, data position, engine, world size, the run config, and the size and
                                          sha256 of every other file
        ema.safetensors                   the consolidated EMA weights, kind and config in its metadata: what
                                          inference loads, at any world size
        state/rank-00000.pt, ...          each rank's slice of the training state (weights, AdamW moments, EMA)

A lone `.safetensors` file with the same metadata (what `convert` writes) is a checkpoint for inference too, and
so is a single `ckpt-*.pt` file written by earlier versions.

Readers take the newest checkpoint that verifies (meta.json readable, every file present with its size and
sha256) and say which ones they skipped and why. Training writes the layout (engine/checkpoint.py); inference,
evaluation and the CLI read it through here, so readers need no training code.
"""
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Optional

import torch

from .files import atomic_write, sha256_file

log = logging.getLogger(__name__)

FORMAT = 2
CKPT_PATTERN = re.compile(r"^ckpt-(\d+)$")
LEGACY_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
META, WEIGHTS = "meta.json", "ema.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def checkpoints_folder(run: Path) -> Path:
    return Path(run) / "checkpoints"


def checkpoint_dir(run: Path, step: int) -> Path:
    return checkpoints_folder(run) / f"ckpt-{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"state/rank-{rank:05d}.pt"


def checkpoint_step(path: Path) -> Optional[int]:
    m = CKPT_PATTERN.match(path.name) if path.is_dir() else LEGACY_PATTERN.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run: Path) -> list[Path]:
    """Every checkpoint of a run (folders, and single files of earlier versions), oldest first, unverified."""
    folder = checkpoints_folder(run)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def is_legacy(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".pt"


def read_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    missing = [k for k in ("format", "kind", "step", "config", "files") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path} has format {meta['format']!r}; this version reads format {FORMAT}")
    return meta


def verify_checkpoint(ckpt: Path, files: Optional[Iterable[str]] = None, hash_files: bool = True) -> dict:
    """meta.json of a checkpoint folder whose listed files (all, or those named) are present with their recorded
    size and sha256; raises CheckpointError naming the first file that is not."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    for name in meta["files"] if files is None else files:
        record = meta["files"].get(name)
        if record is None:
            raise CheckpointError(f"{ckpt / META} does not list {name}")
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, {record['bytes']} were written (truncated or replaced)")
        if hash_files and sha256_file(path) != record["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 (corrupted)")
    return meta


def _verify_legacy(path: Path) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises a different type for each way a file can be torn
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def verify(path: Path, files: Optional[Iterable[str]] = None) -> None:
    if is_legacy(path):
        _verify_legacy(path)
    else:
        verify_checkpoint(path, files)


def newest_verified(run: Path, files: Optional[Iterable[str]] = None,
                    accept_legacy: bool = True) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the newest checkpoint of run that verifies, or None; [(skipped newer checkpoint, why)])."""
    files = None if files is None else list(files)
    skipped = []
    for path in reversed(list_checkpoints(run)):
        if is_legacy(path) and not accept_legacy:
            skipped.append((path, "written by an earlier version (one .pt file): inference reads it, training "
                                  "cannot resume it"))
            continue
        try:
            verify(path, files)
            return path, skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, skipped


def report_skipped(skipped: list[tuple[Path, str]]) -> None:
    for path, why in skipped:
        log.warning("skipping checkpoint %s: %s", path, why)


def resolve_checkpoint(path) -> Path:
    """A checkpoint for inference: a checkpoint folder or file as given (verified), or a run directory's newest
    checkpoint whose weights verify (the skipped ones are logged)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".pt":
            _verify_legacy(path)
        return path
    if (path / META).exists() or checkpoint_step(path) is not None:
        verify_checkpoint(path, [WEIGHTS])
        return path
    found, skipped = newest_verified(path, [WEIGHTS])
    report_skipped(skipped)
    if found is None:
        if skipped:
            raise CheckpointError(f"no checkpoint under {checkpoints_folder(path)} verifies: "
                                  + "; ".join(f"{p.name}: {why}" for p, why in skipped))
        raise FileNotFoundError(f"no checkpoints found under {checkpoints_folder(path)} (expected ckpt-XXXXXXXX folders)")
    return found


def weights_file(path) -> Path:
    """The one file whose bytes are a checkpoint's inference weights (for pinning by sha256)."""
    path = resolve_checkpoint(path)
    return path / WEIGHTS if path.is_dir() else path


def _safetensors_record(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if "kind" not in metadata or "config" not in metadata:
        raise CheckpointError(f"{path} carries no semanticist-fast metadata (kind, config): "
                              "convert official checkpoints with `semanticist-fast convert`")
    return {"kind": metadata["kind"], "config": json.loads(metadata["config"])}, state


def load_weights(path, check_finite: bool = True) -> tuple[str, dict, dict[str, torch.Tensor], Path]:
    """(kind, run config, EMA state dict, the checkpoint it came from) for inference."""
    path = resolve_checkpoint(path)
    if path.is_file() and path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        record, weights = {"kind": state.get("kind"), "config": state["config"]}, state["ema"]
    else:
        record, weights = _safetensors_record(path / WEIGHTS if path.is_dir() else path)
    if check_finite:
        bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"{path} holds non-finite weights in {len(bad)} tensors (first: {bad[0]}); "
                                  "use an earlier checkpoint (a file path, or delete this one from the run)")
    return record["kind"], record["config"], weights, path


def write_weights_file(path: Path, weights: dict[str, torch.Tensor], kind: str, config: dict, step: int = 0) -> None:
    """The inference weights as safetensors, with what they are in the metadata (a checkpoint's ema.safetensors, or
    the lone file `convert` writes)."""
    from safetensors.torch import save

    metadata = {"format": str(FORMAT), "kind": kind, "config": json.dumps(config), "step": str(step)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(Path(path), lambda f: f.write(save(tensors, metadata=metadata)))


def saved_config(path) -> dict:
    """The run config stored with a checkpoint (a folder, a file, or a run directory's newest), without its tensors."""
    path = Path(path)
    if path.is_dir() and (path / META).exists():
        return read_meta(path)["config"]
    path = resolve_checkpoint(path)
    if path.is_dir():
        return read_meta(path)["config"]
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("config", "{}"))
