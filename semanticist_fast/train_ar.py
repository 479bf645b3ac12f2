"""Stage 2: train epsilon-LlamaGen on cached tokenizer tokens."""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from .config import to_dict
from .data.build import DataConfig, build_dataset
from .data.token_cache import CacheConfig, TokenCache, build_token_cache
from .engine.checkpoint import resolve_checkpoint
from .engine.trainer import OptimConfig, TrainConfig, fit_task, resolve_device
from .eval.grid import save_grid
from .kernels.dispatch import set_fast_paths
from .models.gpt import GPT, GPTConfig
from .sampling import generate
from .train_tokenizer import RuntimeConfig

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    cfg: float = 4.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = 1.0
    head_steps: Optional[int] = None  # None: the model's head_sample_steps
    sampler: Literal["sde", "ode"] = "sde"
    decoder_cfg: Optional[float] = None  # None: the tokenizer's
    decoder_steps: Optional[str] = None


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
    preview_classes: int = 8


def cache_dir_for(run: ARRun, out_dir: Path) -> Path:
    path = Path(run.cache.dir)
    return path if path.is_absolute() else Path(out_dir) / path


def prepare_cache(run: ARRun, out_dir: Path, device: torch.device, stop_after_shards: Optional[int] = None):
    """Build (or reuse, or resume) the token cache this run needs; returns (cache dir, tokenizer)."""
    from .tokenizer import Tokenizer

    tokenizer_file = resolve_checkpoint(run.tokenizer)
    tokenizer = Tokenizer.from_checkpoint(tokenizer_file, device=str(device))
    if run.model.token_dim != tokenizer.model.cfg.encoder.slot_dim:
        raise ValueError(f"model.token_dim={run.model.token_dim} but the tokenizer's slots have "
                         f"{tokenizer.model.cfg.encoder.slot_dim} dims")
    if run.model.num_tokens > tokenizer.model.num_slots:
        raise ValueError(f"model.num_tokens={run.model.num_tokens} exceeds the tokenizer's {tokenizer.model.num_slots} slots")
    if run.data.dataset == "procedural" and run.model.num_classes != run.data.num_classes:
        raise ValueError(f"model.num_classes={run.model.num_classes} but data.num_classes={run.data.num_classes}")
    source = build_dataset(run.data, tokenizer.cfg.image_size, "train", seed=run.train.seed, raw=True)
    data_desc = {**to_dict(run.data), "image_size": tokenizer.cfg.image_size, "seed": run.train.seed}
    cache_dir = build_token_cache(tokenizer, tokenizer_file, source, cache_dir_for(run, out_dir), run.model.num_tokens,
                                  run.cache.views, data_desc, run.cache.shard_size, run.cache.encode_batch_size,
                                  progress=run.train.progress, stop_after_shards=stop_after_shards)
    return cache_dir, tokenizer


class ARTask:
    kind = "autoregressive"

    def __init__(self, run: ARRun, device: torch.device, tokenizer):
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


def sample_images(gpt: GPT, tokenizer, labels: torch.Tensor, s: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """Class labels -> images in [0, 1]: the AR model draws the first N tokens, the tokenizer decodes them."""
    tokens = generate(gpt, labels, s.cfg, s.cfg_schedule, s.temperature, generator, s.head_steps, s.sampler)
    return tokenizer.decode(tokens, num_tokens=gpt.num_tokens, cfg=s.decoder_cfg, steps=s.decoder_steps,
                            generator=generator)


def train_ar(run: ARRun, out_dir: Path, resume: bool = False, stop_at_step=None) -> dict:
    set_fast_paths(run.runtime.fast_kernels)
    device = resolve_device(run.train.device)
    torch.manual_seed(run.train.seed)
    cache_dir, tokenizer = prepare_cache(run, out_dir, device)
    train_set = TokenCache(cache_dir, seed=run.train.seed)
    return fit_task(ARTask(run, device, tokenizer), train_set, run, out_dir, device, resume, stop_at_step)
