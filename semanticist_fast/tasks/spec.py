"""What a training stage declares to the trainer (in the manner of torchtitan's train spec)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # the YAML's `kind:` and the checkpoints' "kind"
    run_config: type  # the dataclass a YAML of this kind loads into
    # (run, out_dir, device) -> (task, make_train_set): checks the run's inputs and builds the model, writing
    # nothing; the task has the model, loss(...), new_model() and preview(...) the trainer calls
    # (engine.trainer.Task). make_train_set(world), called once the run holds its directory, returns the training
    # set that yields the batches loss(...) takes (it may build a cache first, each rank a share).
    build: Callable[[Any, Path, torch.device], tuple[Any, Callable[[Any], Any]]]
