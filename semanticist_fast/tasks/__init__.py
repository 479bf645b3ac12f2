"""The training stages, one module each, and the registry that picks one from a YAML's `kind:`.

A stage declares a TaskSpec (tasks/spec.py): its run config and how to build its task and training set. `train`
does the rest, the same for every stage: start the ranks, check the inputs, take the run directory's lock, and
only then write into it; then the engine's trainer trains.
"""
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..common.lock import RunLock
from ..common.runs import CheckpointError, list_checkpoints, read_meta
from ..common.seeds import derive_seed
from ..config import ConfigError, migrate_saved, save_config, to_dict
from ..engine.engines import init_world
from ..engine.trainer import fit_task
from ..kernels.dispatch import set_fast_paths
from . import autoregressive_stage, tokenizer_stage
from .spec import TaskSpec

log = logging.getLogger(__name__)

TASKS: dict[str, TaskSpec] = {spec.kind: spec for spec in (tokenizer_stage.SPEC, autoregressive_stage.SPEC)}
_DROPOUT_STREAM = 5  # each rank's own stream, for element-wise dropout (common/noise.py)


def spec_for(kind: str, source: str = "the config") -> TaskSpec:
    if kind not in TASKS:
        raise ConfigError(f"{source}: kind {kind!r} is not known; use one of {', '.join(map(repr, TASKS))}")
    return TASKS[kind]


def spec_for_file(config_path) -> TaskSpec:
    """The stage a YAML file configures (its `kind:`; a tokenizer when it names none)."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    kind = data.get("kind", "tokenizer") if isinstance(data, dict) else "tokenizer"
    return spec_for(kind, str(path))


def check_run_dir(run, out_dir: Path, resume: bool) -> None:
    """A new run needs a directory without checkpoints; a resumed one the config its newest checkpoint was
    trained with (model, data and optim sections)."""
    found = list_checkpoints(out_dir)
    if not resume:
        if found:
            raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue it, or choose a new --out")
        return
    for path in reversed(found):  # the newest whose config can be read; which one resumes is decided later
        try:
            saved = read_meta(path)["config"]
        except CheckpointError:
            continue
        saved = migrate_saved(type(run), saved)
        diffs = _config_differences(saved, to_dict(run), sections=("model", "data", "optim"))
        if diffs:
            raise ConfigError(f"cannot resume {out_dir}: its checkpoint was trained with a different config:\n  "
                              + "\n  ".join(diffs) + "\nuse the same config and overrides, or a new --out directory")
        if "tokenizer_sha256" in saved and hasattr(run, "tokenizer_sha256"):
            run.tokenizer_sha256 = saved["tokenizer_sha256"] or run.tokenizer_sha256
        return


def _config_differences(a: dict, b: dict, sections) -> list[str]:
    diffs = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            diffs.append(f"{prefix}: checkpoint {x!r} vs now {y!r}")

    for s in sections:
        walk(a.get(s), b.get(s), s)
    return diffs


def load_deepspeed_config(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config {path} does not exist") from None
    except ValueError as e:
        raise ConfigError(f"--deepspeed-config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed-config {path} must hold a JSON object")
    return data


def train(run, out_dir: Path, resume: bool = False, stop_at_step: Optional[int] = None,
          deepspeed_config: Optional[dict] = None) -> dict:
    """Train a stage's run config (TokenizerRun, ARRun) into out_dir; returns the last logged metrics."""
    out_dir = Path(out_dir)
    spec = spec_for(run.kind)
    if deepspeed_config is not None and run.train.engine != "deepspeed":
        raise ConfigError("--deepspeed-config is given but train.engine is 'single': set train.engine=deepspeed")
    set_fast_paths(run.runtime.fast_kernels)
    world = init_world(run.train.engine, run.train.device, run.train.collective_timeout_s)
    run.train.batch_plan(world.size)  # a batch that does not split over these ranks fails before anything starts
    check_run_dir(run, out_dir, resume)
    torch.manual_seed(run.train.seed)  # every rank builds the same initial model
    task, make_train_set = spec.build(run, out_dir, world.device)
    torch.manual_seed(derive_seed(run.train.seed, _DROPOUT_STREAM, world.rank))
    lock = RunLock(out_dir).acquire() if world.is_main else None
    try:
        world.barrier("run directory lock")
        if world.is_main:
            save_config(run, out_dir / "config.yaml")
        train_set = make_train_set(world)
        return fit_task(task, train_set, run, out_dir, world, resume, stop_at_step, deepspeed_config)
    finally:
        if lock is not None:
            lock.release()
