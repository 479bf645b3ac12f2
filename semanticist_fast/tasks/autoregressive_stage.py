"""Stage 2: epsilon-LlamaGen on cached tokenizer tokens, as a training task.

The run pins the tokenizer it trains on: at its first start the tokenizer's EMA weights are copied into
RUN/tokenizer.safetensors and their sha256 recorded in the run config (`tokenizer_sha256`); the token cache, the
previews and `sample` use that copy, so training the tokenizer further (or pruning its checkpoints) never changes
what this model's tokens mean.
"""
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..common.files import atomic_write, sha256_file
from ..common.noise import SampleNoise
from ..common.runs import weights_file
from ..common.sample_settings import tokens_to_generate
from ..config import ConfigError, to_dict
from ..data.datasets import DataConfig, build_dataset
from ..data.token_cache import CacheConfig, TokenCache, build_token_cache
from ..engine.train_config import OptimConfig, RuntimeConfig, TrainConfig
from ..eval.eval_config import EvalConfig
from ..eval.grid import save_grid
from ..inference.generation import PINNED_TOKENIZER, SampleConfig, sample_images
from ..inference.tokenizer_api import Tokenizer
from ..models.gpt import GPT, GPTConfig
from .spec import TaskSpec

log = logging.getLogger(__name__)


@dataclass
class ARRun:
    kind: Literal["autoregressive"] = "autoregressive"
    tokenizer: str = "runs/tokenizer_tiny"  # tokenizer checkpoint file or run directory
    tokenizer_sha256: str = ""  # set at the first start: the pinned tokenizer's weights
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


def pinned_tokenizer(run: ARRun, out_dir: Path) -> tuple[Path, str]:
    """(the tokenizer weights this run trains on, their sha256): the run's own copy once it has one, else the
    newest verified checkpoint of run.tokenizer. Sets run.tokenizer_sha256."""
    copy = Path(out_dir) / PINNED_TOKENIZER
    source = copy if copy.exists() else weights_file(run.tokenizer)
    digest = sha256_file(source)
    if run.tokenizer_sha256 and run.tokenizer_sha256 != digest:
        raise ValueError(f"tokenizer_sha256={run.tokenizer_sha256} is set, but {source} has sha256 {digest}: this "
                         "run was started on another tokenizer; leave tokenizer_sha256 unset for a new run")
    run.tokenizer_sha256 = digest
    return source, digest


class ARTask:
    kind = "autoregressive"

    def __init__(self, run: ARRun, device: torch.device, tokenizer: Tokenizer):
        self.run, self.device, self.tokenizer = run, device, tokenizer
        self.model = GPT(run.model).to(device)

    def new_model(self) -> GPT:
        return GPT(self.run.model)

    def loss(self, model: GPT, batch, step: int, epoch: int, rng: Optional[SampleNoise] = None):
        tokens = batch[0].to(self.device, non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True)
        loss = model.forward_loss(tokens, labels, rng)
        return loss, {"loss": loss}

    @torch.no_grad()
    def preview(self, model: GPT, step: int, path: Path) -> None:
        labels = torch.arange(min(self.run.preview_classes, model.num_classes), device=self.device)
        images = sample_images(model, self.tokenizer, labels, self.run.sample, torch.Generator(self.device).manual_seed(0))
        save_grid([images], path)


def build(run: ARRun, out_dir: Path, device: torch.device):
    """Checks the tokenizer and the data against the model (writing nothing); the training set comes from
    make_train_set(world), which pins the tokenizer into the run and builds (or resumes) the token cache."""
    if run.data.loader != "torch" or run.data.latents:
        raise ConfigError("data.loader=dali and data.latents are the tokenizer stage's (and `cache`'s); the AR stage "
                          "trains from its token cache: leave them unset")
    try:
        tokens_to_generate(run.sample.tokens, run.model.num_tokens)  # the previews' k: refused before training
    except ValueError as e:
        raise ConfigError(str(e)) from None
    source, digest = pinned_tokenizer(run, out_dir)
    # The previews sample in the training precision (train.precision: bf16 or fp32).
    tokenizer = Tokenizer.from_checkpoint(source, device=str(device), precision=run.train.precision)
    slot_dim = tokenizer.config.encoder.slot_dim
    if run.model.token_dim != slot_dim:
        raise ValueError(f"model.token_dim={run.model.token_dim} but the tokenizer's slots have {slot_dim} dims")
    if run.model.num_tokens > tokenizer.num_slots:
        raise ValueError(f"model.num_tokens={run.model.num_tokens} exceeds the tokenizer's {tokenizer.num_slots} slots")
    if run.data.dataset == "procedural" and run.model.num_classes != run.data.num_classes:
        raise ValueError(f"model.num_classes={run.model.num_classes} but data.num_classes={run.data.num_classes}")
    source_set = build_dataset(run.data, tokenizer.image_size, "train", seed=run.train.seed, raw=True)

    def make_train_set(world):
        copy = Path(out_dir) / PINNED_TOKENIZER
        if world.is_main and not copy.exists():
            def write_copy(f):
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
            atomic_write(copy, write_copy)
            log.info("pinned the tokenizer %s (sha256 %s) as %s", source, digest[:12], copy)
        data_desc = {**to_dict(run.data), "image_size": tokenizer.image_size, "seed": run.train.seed}
        cache_dir = build_token_cache(tokenizer, source, source_set, cache_dir_for(run, out_dir), run.model.num_tokens,
                                      run.cache.views, data_desc, run.cache.shard_size, run.cache.encode_batch_size,
                                      progress=run.train.progress and world.is_main, tokenizer_sha256=digest,
                                      rank=world.rank, world_size=world.size)
        world.barrier("token cache build")
        return TokenCache(cache_dir, seed=run.train.seed, num_classes=run.model.num_classes)

    return ARTask(run, device, tokenizer), make_train_set


SPEC = TaskSpec(kind="autoregressive", run_config=ARRun, build=build)
