"""What a training stage declares to the trainer (in the manner of torchtitan's train spec)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # the YAML's `kind:` and the checkpoints' "kind"
    run_config: type  # the dataclass a YAML of this kind loads into
    # (run, out_dir, device) -> (task, training set): the task has the model, loss(...) and preview(...) the
    # trainer calls (engine.trainer.Task); the training set yields the batches loss(...) takes.
    build: Callable[[Any, Path, torch.device], tuple[Any, Any]]
