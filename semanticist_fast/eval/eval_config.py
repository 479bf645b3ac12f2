"""The `eval` section: what `semanticist-fast eval recon` and `eval gen` measure, and against what.

A run config may carry an `eval:` section (it is saved in the checkpoint); `--config FILE` reads the `eval:` section
of another YAML over it; `eval.key=value` overrides and the command's flags come last.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from ..config import ConfigError, apply_overrides, from_dict


@dataclass
class EvalConfig:
    inception_path: str = ""  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth (never downloaded)
    reference: str = ""  # an ADM-style .npz: `mu` + `sigma`, or images `arr_0`; empty: computed from the run's data
    fid_features: Literal["2048", "768", "192", "64"] = "2048"  # Inception layer of FID: 2048 = pool, as published
    reference_images: int = 0  # gen without `reference`: training images for the statistics (0: as many as samples)
    num_images: int = 0  # recon: held-out images (0: all; the published protocol: the 50,000 ImageNet val images)
    per_class: int = 50  # gen: samples per class (the published protocol: 50 for each of 1,000 classes)
    tokens: str = "all"  # recon: token counts to score, e.g. "1,2,4,all"
    shard_size: int = 100  # images per shard, generated as one batch: the unit of resuming and of the rank split
    inception_batch: int = 100
    is_splits: int = 10
    seed: int = 0
    write_npz: bool = True  # the ADM evaluator's .npz of the samples / reconstructions too
    grid_images: int = 8  # per row of the PNG preview

    def validate(self):
        for name in ("shard_size", "inception_batch", "is_splits", "per_class", "grid_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_images", "reference_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be 0 (all / as many as samples) or more, "
                                  f"got {getattr(self, name)}")


@dataclass
class _EvalFile:
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolve_eval_config(saved_run_config: dict, config_file: Optional[str] = None,
                        overrides: Optional[list[str]] = None, **flags) -> EvalConfig:
    """The checkpoint's `eval` section, then config_file's, then `eval.key=value` overrides, then the flags that
    are not None."""
    data = dict(saved_run_config.get("eval") or {})
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or not isinstance(loaded.get("eval", {}), dict):
            raise ConfigError(f"{path}: expected a mapping with an `eval:` section")
        if "eval" not in loaded:
            raise ConfigError(f"{path} has no `eval:` section (its sections: {', '.join(loaded) or 'none'})")
        data.update(loaded["eval"])
    data = apply_overrides({"eval": data}, list(overrides or []), _EvalFile)["eval"]
    data.update({name: value for name, value in flags.items() if value is not None})
    return from_dict(EvalConfig, data, prefix="eval.")
