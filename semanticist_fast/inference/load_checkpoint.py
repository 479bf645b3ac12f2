"""The one checkpoint loader: a run directory, checkpoint folder or weights file -> a model with its EMA weights.

Reads only the `model` section of the saved run config, so training checkpoints and converted official ones load
alike, and no training code is needed to read them (common/runs.py reads the files and refuses non-finite weights).
"""
from pathlib import Path
from typing import Callable, Optional

import torch

from ..common.runs import load_weights
from ..config import from_dict, migrate_saved
from ..models.weights import load_model_state


def load_model(path, kind: str, config_cls, model_cls,
               edit_model_config: Optional[Callable[[dict], dict]] = None) -> tuple[torch.nn.Module, dict, Path]:
    """(model on the CPU in eval mode, the saved run config with renamed keys migrated, the checkpoint read).

    kind: "tokenizer" or "autoregressive", checked against the checkpoint's. edit_model_config: a change to the
    saved model section before the model is built (e.g. a moved VAE path).
    """
    saved_kind, run_config, weights, checkpoint = load_weights(path)
    if saved_kind != kind:
        raise ValueError(f"{checkpoint} is a {saved_kind!r} checkpoint, not a {kind} checkpoint")
    run_config = dict(run_config)
    model_config = migrate_saved(config_cls, run_config["model"])
    if edit_model_config is not None:
        model_config = edit_model_config(model_config)
    run_config["model"] = model_config
    model = model_cls(from_dict(config_cls, model_config, prefix="model."))
    load_model_state(model, weights, what=f"checkpoint {checkpoint}")
    return model.eval(), run_config, checkpoint
