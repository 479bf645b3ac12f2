"""The training stages, one module each, and the registry that picks one from a YAML's `kind:`.

A stage declares a TaskSpec (tasks/spec.py): its run config and how to build its task and training set. The
engine's trainer does the rest, the same for every stage.
"""
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..common.device import resolve_device
from ..config import ConfigError
from ..engine.trainer import fit_task
from ..kernels.dispatch import set_fast_paths
from . import autoregressive, tokenizer
from .spec import TaskSpec

TASKS: dict[str, TaskSpec] = {spec.kind: spec for spec in (tokenizer.SPEC, autoregressive.SPEC)}


def spec_for(kind: str, source: str = "the config") -> TaskSpec:
    if kind not in TASKS:
        raise ConfigError(f"{source}: kind {kind!r} is not known; use one of {', '.join(map(repr, TASKS))}")
    return TASKS[kind]


def spec_for_file(config_path) -> TaskSpec:
    """The stage a YAML file configures (its `kind:`; a tokenizer when it names none)."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    kind = data.get("kind", "tokenizer") if isinstance(data, dict) else "tokenizer"
    return spec_for(kind, str(path))


def train(run, out_dir: Path, resume: bool = False, stop_at_step: Optional[int] = None) -> dict:
    """Train a stage's run config (TokenizerRun, ARRun) into out_dir; returns the last logged metrics."""
    spec = spec_for(run.kind)
    set_fast_paths(run.runtime.fast_kernels)
    device = resolve_device(run.train.device)
    torch.manual_seed(run.train.seed)
    task, train_set = spec.build(run, Path(out_dir), device)
    return fit_task(task, train_set, run, Path(out_dir), device, resume, stop_at_step)
