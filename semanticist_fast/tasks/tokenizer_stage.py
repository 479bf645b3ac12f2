"""Stage 1: the Semanticist tokenizer, as a training task."""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..common.noise import SampleNoise
from ..common.files import sha256_file
from ..config import ConfigError
from ..data.datasets import DataConfig, build_dataset, dali_images, held_out_dataset, images_identity
from ..data.latent_cache import FORMAT_VERSION as LATENT_FORMAT
from ..data.latent_cache import DaliLatentViews, LatentCache, LatentViews
from ..engine.train_config import OptimConfig, RuntimeConfig, TrainConfig
from ..eval.eval_config import EvalConfig
from ..eval.grid import save_grid, token_counts
from ..inference.tokenizer_api import Tokenizer
from ..models.latent_codec import build_codec, codec_geometry, codec_weights_file
from ..models.tokenizer import SemanticistTokenizer, TokenizerConfig, build_decoder_process
from .spec import TaskSpec

log = logging.getLogger(__name__)


@dataclass
class TokenizerRun:
    kind: Literal["tokenizer"] = "tokenizer"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # `semanticist-fast eval` defaults for this run
    preview_images: int = 8
    preview_steps: Optional[str] = None  # decoder steps of the previews; None: model.diffusion.sample_steps


class TokenizerTask:
    kind = "tokenizer"

    def __init__(self, run: TokenizerRun, device: torch.device, preview_batch: Optional[torch.Tensor],
                 codec: Optional[torch.nn.Module] = None, teacher: Optional[torch.nn.Module] = None):
        """codec / teacher: frozen modules to use instead of the configured ones (benchmarks pass stand-ins)."""
        cfg = run.model
        self.run, self.device = run, device
        self.codec = build_codec(cfg.codec).to(device) if codec is None else codec
        self.model = SemanticistTokenizer(cfg).to(device)
        self.process = build_decoder_process(cfg).to(device)
        self.teacher = teacher
        if teacher is None and cfg.repa.teacher_path:
            from ..models.dinov2 import load_dinov2
            self.teacher = load_dinov2(cfg.repa.teacher_path, device=device)
        elif teacher is None:
            log.info("REPA is off: no model.repa.teacher_path given")
        if device.type == "cuda" and run.train.precision == "bf16":
            # Frozen, outside the engine, on every rank: bf16 halves their memory; the loss runs them under autocast.
            self.codec.to(torch.bfloat16)
            if self.teacher is not None:
                self.teacher.to(torch.bfloat16)
        self.preview_batch = preview_batch

    def new_model(self) -> SemanticistTokenizer:
        return SemanticistTokenizer(self.run.model)

    def loss(self, model: SemanticistTokenizer, batch, step: int, epoch: int, rng: Optional[SampleNoise] = None):
        """batch: (images, labels), or with data.latents (images, labels, posterior mean, logvar) of the same views;
        the posterior is sampled here either way, with the trainer's noise. The frozen codec and teacher run here;
        the rest is the model's forward_loss."""
        images = batch[0].to(self.device, non_blocking=True)
        with torch.no_grad():
            if len(batch) == 4:
                mean, logvar = (t.to(self.device, non_blocking=True) for t in batch[2:])
                latents = self.codec.sample(mean, logvar, rng).float()
            else:
                latents = self.codec.encode(images, rng).float()
            target = self.teacher(images) if self.teacher is not None else None
        return model.forward_loss(images, latents, self.process, step, epoch, target, rng)

    @torch.no_grad()
    def preview(self, model: SemanticistTokenizer, step: int, path: Path) -> None:
        """Reconstructions of fixed held-out images from 1, 2, 4, ... tokens (rows), originals on top."""
        was_training = model.training
        tok = Tokenizer(model, self.codec, self.device, self.run.train.precision)  # the frozen parts may be bf16
        generator = torch.Generator(self.device).manual_seed(0)
        recs = tok.reconstruct(self.preview_batch, token_counts(model.num_slots), steps=self.run.preview_steps,
                               generator=generator)
        save_grid([self.preview_batch] + list(recs.values()), path)
        model.train(was_training)


def codec_weights_sha256(run: TokenizerRun) -> str:
    path = codec_weights_file(run.model.codec)
    if not path.is_file():
        raise FileNotFoundError(f"model.codec.path: {path} does not exist (the KL-16 VAE's weights)")
    return sha256_file(path)


def latent_identity(run: TokenizerRun, raw_set) -> dict:
    """What a latent cache must have been built from to train this run (data/latent_cache.py's manifest)."""
    channels, side = codec_geometry(run.model.codec, run.model.image_size)
    return {"version": LATENT_FORMAT, "codec_weights_sha256": codec_weights_sha256(run),
            "images": images_identity(run.data, raw_set, run.train.seed), "image_size": run.model.image_size,
            "latent_shape": [channels, side, side], "num_items": len(raw_set)}


def _needs_kl16(run: TokenizerRun, what: str) -> None:
    if run.model.codec.kind != "kl16":
        raise ConfigError(f"{what} holds the KL-16 VAE's posterior, but model.codec.kind={run.model.codec.kind!r}: "
                          "set model.codec.kind=kl16 and model.codec.path (with pixels there is nothing to cache)")


def build_latent_cache_for_run(run: TokenizerRun, out: Path, views: str = "ten_crop", shard_size: int = 256,
                               batch_size: int = 64, progress: bool = True,
                               stop_after_shards: Optional[int] = None) -> tuple[Path, bool]:
    """`semanticist-fast cache`: this process's share (under a launcher, rank r of R builds shards r, r + R, ...)
    of the latent cache of run.data's training images. Returns (the directory, whether the cache is complete)."""
    from ..data.latent_cache import NAMES, build_latent_cache
    from ..data.shards import CacheError, open_shards
    from ..common.distributed import ranks_from_env
    from ..engine.engines import init_world

    _needs_kl16(run, "the latent cache")
    world = init_world("deepspeed" if ranks_from_env().world_size > 1 else "single", run.train.device,
                       run.train.collective_timeout_s)
    raw_set = build_dataset(run.data, run.model.image_size, "train", seed=run.train.seed, raw=True)
    identity = latent_identity(run, raw_set)
    codec = build_codec(run.model.codec).to(world.device)
    view_batches = None
    if run.data.loader == "dali":
        images = dali_images(run.data, raw_set, world, progress, max(1, run.train.num_workers))
        view_batches = lambda indices, per: images.view_batches(indices, views, run.model.image_size, per)  # noqa: E731
    build_latent_cache(codec, identity["codec_weights_sha256"], raw_set, out, views, run.model.image_size,
                       identity["images"], world.device, shard_size, batch_size, view_batches,
                       progress=progress and world.is_main, stop_after_shards=stop_after_shards, rank=world.rank,
                       world_size=world.size)
    try:
        open_shards(out, NAMES, what="latent cache", verify_shards=0)
        return Path(out), True
    except CacheError:
        return Path(out), False


def build(run: TokenizerRun, out_dir: Path, device: torch.device):
    """The task and its training set (checked, nothing written); with data.loader=dali the set is read through DALI
    (the folder scanned first), with data.latents from the latent cache (checked against this run)."""
    latents = run.data.latents
    if latents:
        _needs_kl16(run, f"data.latents={latents}")
    train_set = build_dataset(run.data, run.model.image_size, "train", seed=run.train.seed, raw=bool(latents))
    val_set = held_out_dataset(run.data, run.model.image_size, run.train.seed)
    preview = torch.stack([val_set[i][0] for i in range(min(run.preview_images, len(val_set)))]).to(device)
    expected = latent_identity(run, train_set) if latents else None

    def make_train_set(world):
        images = train_set
        if run.data.loader == "dali":
            images = dali_images(run.data, train_set, world, run.train.progress, max(1, run.train.num_workers))
        if not latents:
            return images
        cache = LatentCache(latents, expected)
        views = DaliLatentViews if run.data.loader == "dali" else LatentViews
        return views(cache, images, run.model.image_size, seed=run.train.seed)

    return TokenizerTask(run, device, preview), make_train_set


SPEC = TaskSpec(kind="tokenizer", run_config=TokenizerRun, build=build)
