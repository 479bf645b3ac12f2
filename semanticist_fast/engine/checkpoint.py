"""Training checkpoints: written by every rank into one folder that appears whole or not at all, and restored at
any world size. The layout is described in common/runs.py.

Writing: each rank saves its slice of the state (engine/shard.py: fp32 weights, AdamW moments, EMA, with their
offsets) into a temporary folder, then the main rank assembles the consolidated EMA from those files (no
collective moves the model), records every file's size and sha256 in meta.json, and renames the folder into
place. A crash at any point leaves the previous checkpoints as they were and at most a temporary folder, which
the next start removes. A full disk ends in one DiskFullError naming the path, every rank alike.

Restoring: a checkpoint saved by N ranks restores onto M: each rank copies the pieces of the saved slices that
overlap the slices it owns now (the pages of the other ranks' files it does not need are never read).
"""
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..common.distributed import World
from ..common.files import DiskFullError, atomic_write, atomic_write_text, fsync_dir, sha256_file
from ..common.runs import (FORMAT, META, WEIGHTS, CheckpointError, checkpoint_dir, checkpoints_folder, is_legacy,
                           list_checkpoints, rank_state_name, read_meta, verify_checkpoint, write_weights_file)
from .ema import EMA
from .shard import MOMENTS, Shard, copy_overlaps

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-ckpt-"
ASIDE_PREFIX = "unreadable-"


def _slice_state(shard: Shard, ema: EMA) -> dict:
    """This rank's slices as plain CPU tensors (copies: saving a view would save all the storage behind it)."""
    shard.ensure_state()
    out = {}
    for fragment, shadow in zip(shard.fragments, ema.shadows):
        entry = {"start": fragment.start, "shape": list(fragment.shape),
                 "param": fragment.master.detach().to("cpu", copy=True),
                 "ema": shadow.detach().to("cpu", copy=True)}
        for key in MOMENTS:
            entry[key] = fragment.moment(key).detach().to("cpu", copy=True)
        out[fragment.name] = entry
    return out


def _assemble(shards: list[dict], name: str, key: str) -> torch.Tensor:
    """Parameter `name`'s whole `key` tensor ("param", "ema", a moment) from the ranks' slices."""
    pieces = [(s[name]["start"], s[name][key]) for s in shards if name in s]
    if not pieces:
        raise CheckpointError(f"no rank saved a slice of {name}")
    shape = next(s[name]["shape"] for s in shards if name in s)
    flat = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.float32)
    covered = copy_overlaps(flat, 0, pieces)
    if covered != flat.numel():
        raise CheckpointError(f"the ranks' slices cover {covered} of {flat.numel()} elements of {name}")
    return flat.view(shape)


def _rank_slices(folder: Path, ranks: int) -> list[dict]:
    return [torch.load(folder / rank_state_name(r), map_location="cpu", weights_only=True, mmap=True)["slices"]
            for r in range(ranks)]


def _consolidated_ema(world: World, tmp: Path, own: dict, buffers: dict[str, torch.Tensor],
                      order: list[str]) -> dict[str, torch.Tensor]:
    """The whole EMA state dict, from every rank's file (own slices without a read)."""
    shards = [own] if world.size == 1 else _rank_slices(tmp, world.size)
    return {name: buffers[name].detach().to("cpu", copy=True).contiguous() if name in buffers
            else _assemble(shards, name, "ema") for name in order}


def save_checkpoint(world: World, run_dir: Path, step: int, meta: dict, shard: Shard, ema: EMA,
                    buffers: dict[str, torch.Tensor], order: list[str], rng: dict, keep: int) -> Path:
    """Write checkpoint `step` (every rank calls this). meta: kind, config, epoch, step_in_epoch, engine,
    zero_stage; buffers: the model's persistent buffers (the main rank's are saved); order: the state-dict keys,
    in the model's order, that the consolidated EMA holds."""
    folder = checkpoints_folder(run_dir)
    final, tmp = checkpoint_dir(run_dir, step), folder / f"{TMP_PREFIX}{step:08d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "state").mkdir(parents=True)
    world.barrier("checkpoint start")
    slices = _slice_state(shard, ema)
    name = rank_state_name(world.rank)
    record = None
    try:
        atomic_write(tmp / name, lambda f: torch.save({"rank": world.rank, "world_size": world.size,
                                                       "optimizer_steps": shard.optimizer_steps(),
                                                       "slices": slices, "rng": rng}, f))
        record = (name, (tmp / name).stat().st_size, sha256_file(tmp / name))
    except DiskFullError as e:
        record = ("disk-full", str(e))
    records = world.all_gather_object(record, "checkpoint write")
    failed = [r[1] for r in records if r[0] == "disk-full"]
    error: Optional[BaseException] = None
    if world.is_main:
        try:
            if failed:
                raise DiskFullError(tmp, needed=_slices_bytes(slices) * world.size)
            files = {n: {"bytes": size, "sha256": digest} for n, size, digest in records}
            weights = _consolidated_ema(world, tmp, slices, buffers, order)
            write_weights_file(tmp / WEIGHTS, weights, meta["kind"], meta["config"], step)
            files[WEIGHTS] = {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": sha256_file(tmp / WEIGHTS)}
            atomic_write_text(tmp / META, json.dumps({"format": FORMAT, "step": step, "world_size": world.size,
                                                      **meta, "files": files}, indent=1))
            if final.exists():
                raise CheckpointError(f"{final} exists already, and this run did not write it")
            tmp.rename(final)
            fsync_dir(folder)
            prune_checkpoints(run_dir, keep)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    message = world.broadcast_object(None if error is None else str(error), "checkpoint commit")
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"checkpoint {final} was not written: {message}")
    return final


def _slices_bytes(slices: dict) -> int:
    return sum(t.numel() * t.element_size() for entry in slices.values() for t in entry.values()
               if isinstance(t, torch.Tensor))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all). Only verified checkpoints are written, so the newest
    good one is always among those kept."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def remove_orphans(run_dir: Path) -> list[Path]:
    """Temporary folders and files left by a kill mid-write; returns what was removed."""
    folder = checkpoints_folder(run_dir)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX) or (p.name.startswith(".ckpt-") and p.name.endswith(".tmp")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not verify out of the way (kept, for a look; never read again)."""
    target = path.with_name(ASIDE_PREFIX + path.name)
    path.rename(target)
    return target


def choose_checkpoint(world: World, run_dir: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint of run_dir that verifies in full (every rank hashes a share of its files), and the newer
    ones skipped, with why. Checkpoints of earlier versions (one .pt file) cannot be resumed and are skipped."""
    skipped = []
    candidates = world.broadcast_object([str(p) for p in reversed(list_checkpoints(run_dir))], "checkpoint list")
    for candidate in map(Path, candidates):
        if is_legacy(candidate):
            skipped.append((candidate, "written by an earlier version (one .pt file): `reconstruct` and `sample` "
                                       "read it, training cannot resume it"))
            continue
        problem = None
        try:
            names = sorted(read_meta(candidate)["files"])
            verify_checkpoint(candidate, names[world.rank::world.size])
        except CheckpointError as e:
            problem = str(e)
        problems = [p for p in world.all_gather_object(problem, "checkpoint verification") if p]
        if not problems:
            return candidate, skipped
        skipped.append((candidate, problems[0]))
    return None, skipped


def restore_checkpoint(world: World, ckpt: Path, shard: Shard, ema: EMA, param_names: list[str]) -> dict:
    """Load checkpoint `ckpt` into this rank's slices (every rank calls this); returns its meta (step, data
    position). param_names: the model's trainable parameters, which the checkpoint must hold exactly. The RNG
    states come back too when the partition is the one that was saved."""
    meta = read_meta(ckpt)
    saved_ranks = meta["world_size"]

    def load(rank: int) -> dict:
        return torch.load(ckpt / rank_state_name(rank), map_location="cpu", weights_only=True, mmap=True)

    states = None
    if saved_ranks == world.size:
        own = load(world.rank)
        if _slices_match(own["slices"], shard):
            states = [own]
    if states is None:
        states = [load(r) for r in range(saved_ranks)]
        saved_names, own_names = set().union(*(s["slices"] for s in states)), set(param_names)
        if saved_names != own_names:
            raise CheckpointError(f"{ckpt} does not hold this model's parameters (missing: "
                                  f"{sorted(own_names - saved_names)[:5]}, unexpected: "
                                  f"{sorted(saved_names - own_names)[:5]}): was it made with a different config?")
    shard.ensure_state()
    with torch.no_grad():
        for fragment, shadow in zip(shard.fragments, ema.shadows):
            for key, target in (("param", fragment.master), ("ema", shadow),
                                *((k, fragment.moment(k)) for k in MOMENTS)):
                pieces = [(s["slices"][fragment.name]["start"], s["slices"][fragment.name][key])
                          for s in states if fragment.name in s["slices"]]
                covered = copy_overlaps(target, fragment.start, pieces)
                if covered != fragment.numel:
                    raise CheckpointError(f"{ckpt}: the saved slices of {fragment.name} cover {covered} of the "
                                          f"{fragment.numel} elements this rank needs (a different model config?)")
    shard.set_optimizer_steps(states[0]["optimizer_steps"])
    shard.publish()
    if len(states) == 1:
        _set_rng(states[0]["rng"], world.device)
    return meta


def _slices_match(saved: dict, shard: Shard) -> bool:
    """Whether this rank's saved slices are exactly the ones it owns now (same names, offsets and sizes)."""
    if set(saved) != {f.name for f in shard.fragments}:
        return False
    return all(saved[f.name]["start"] == f.start and saved[f.name]["param"].numel() == f.numel
               for f in shard.fragments)


def consolidated_slices(ckpt: Path, key: str = "param") -> dict[str, torch.Tensor]:
    """Whole tensors assembled from every rank's slices of a checkpoint: "param" (the trained weights), "ema",
    "exp_avg" or "exp_avg_sq". For tools and tests; inference reads ema.safetensors."""
    shards = _rank_slices(Path(ckpt), read_meta(ckpt)["world_size"])
    return {name: _assemble(shards, name, key) for name in sorted(set().union(*shards))}


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
