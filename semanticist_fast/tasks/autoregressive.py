"""Stage 2: epsilon-LlamaGen on cached tokenizer tokens, as a training task."""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..common.runs import resolve_checkpoint
from ..config import to_dict
from ..data.build import DataConfig, build_dataset
from ..data.token_cache import CacheConfig, TokenCache, build_token_cache
from ..engine.config import OptimConfig, RuntimeConfig, TrainConfig
from ..eval.config import EvalConfig
from ..eval.grid import save_grid
from ..inference.generation import SampleConfig, sample_images
from ..inference.tokenizer import Tokenizer
from ..models.gpt import GPT, GPTConfig
from .spec import TaskSpec

log = logging.getLogger(__name__)


@dataclass
class ARRun:
    kind: Literal["autoregressive"] = "autoregressive"
    tokenizer: str = "runs/tokenizer_tiny"  # tokenizer checkpoint file or run directory
    model: GPTConfig = field(default_factory=GPTConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1e-4, warmup_epochs=1.0, schedule="constant",
                                                                   grad_clip=1.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # `semanticist-fast eval` defaults for this run
    preview_classes: int = 8


def cache_dir_for(run: ARRun, out_dir: Path) -> Path:
    path = Path(run.cache.dir)
    return path if path.is_absolute() else Path(out_dir) / path


def prepare_cache(run: ARRun, out_dir: Path, device: torch.device, stop_after_shards: Optional[int] = None):
    """Build (or reuse, or resume) the token cache this run needs; returns (cache dir, tokenizer)."""
    tokenizer_file = resolve_checkpoint(run.tokenizer)
    tokenizer = Tokenizer.from_checkpoint(tokenizer_file, device=str(device))
    slot_dim = tokenizer.config.encoder.slot_dim
    if run.model.token_dim != slot_dim:
        raise ValueError(f"model.token_dim={run.model.token_dim} but the tokenizer's slots have {slot_dim} dims")
    if run.model.num_tokens > tokenizer.num_slots:
        raise ValueError(f"model.num_tokens={run.model.num_tokens} exceeds the tokenizer's {tokenizer.num_slots} slots")
    if run.data.dataset == "procedural" and run.model.num_classes != run.data.num_classes:
        raise ValueError(f"model.num_classes={run.model.num_classes} but data.num_classes={run.data.num_classes}")
    source = build_dataset(run.data, tokenizer.image_size, "train", seed=run.train.seed, raw=True)
    data_desc = {**to_dict(run.data), "image_size": tokenizer.image_size, "seed": run.train.seed}
    cache_dir = build_token_cache(tokenizer, tokenizer_file, source, cache_dir_for(run, out_dir), run.model.num_tokens,
                                  run.cache.views, data_desc, run.cache.shard_size, run.cache.encode_batch_size,
                                  progress=run.train.progress, stop_after_shards=stop_after_shards)
    return cache_dir, tokenizer


class ARTask:
    kind = "autoregressive"

    def __init__(self, run: ARRun, device: torch.device, tokenizer: Tokenizer):
        self.run, self.device, self.tokenizer = run, device, tokenizer
        self.model = GPT(run.model).to(device)

    def loss(self, model: GPT, batch, step: int, epoch: int):
        tokens = batch[0].to(self.device, non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True)
        loss = model.forward_loss(tokens, labels)
        return loss, {"loss": loss}

    @torch.no_grad()
    def preview(self, model: GPT, step: int, path: Path) -> None:
        labels = torch.arange(min(self.run.preview_classes, model.num_classes), device=self.device)
        images = sample_images(model, self.tokenizer, labels, self.run.sample, torch.Generator(self.device).manual_seed(0))
        save_grid([images], path)


def build(run: ARRun, out_dir: Path, device: torch.device):
    cache_dir, tokenizer = prepare_cache(run, out_dir, device)
    return ARTask(run, device, tokenizer), TokenCache(cache_dir, seed=run.train.seed)


SPEC = TaskSpec(kind="autoregressive", run_config=ARRun, build=build)
