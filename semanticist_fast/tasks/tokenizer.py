"""Stage 1: the Semanticist tokenizer, as a training task."""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..common.noise import SampleNoise
from ..data.build import DataConfig, build_dataset, held_out_dataset
from ..engine.config import OptimConfig, RuntimeConfig, TrainConfig
from ..eval.config import EvalConfig
from ..eval.grid import save_grid, token_counts
from ..inference.tokenizer import Tokenizer
from ..models.dit import repa_loss
from ..models.latent_codec import build_codec
from ..models.tokenizer import SemanticistTokenizer, TokenizerConfig, decoder_process
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
        self.process = decoder_process(cfg).to(device)
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
        images = batch[0].to(self.device, non_blocking=True)
        with torch.no_grad():
            latents = self.codec.encode(images, rng).float()
            target = self.teacher(images) if self.teacher is not None else None
        tokens = model.encode(images, rng)
        keep = model.nested.sample_keep(images.shape[0], step, epoch, self.device, rng)
        projected = {}

        def denoiser(x_t, timesteps):
            if target is None:
                return model.dit(x_t, timesteps, tokens, keep=keep)
            out, projected["repa"] = model.dit(x_t, timesteps, tokens, return_repa=True, keep=keep)
            return out

        terms = self.process.training_losses(denoiser, latents, rng=rng)
        loss = terms["loss"].mean()
        metrics = {"loss": loss, "mse": terms["mse"].mean()}
        if "vb" in terms:
            metrics["vb"] = terms["vb"].mean()
        if target is not None:
            repa = repa_loss(projected["repa"], target).mean()
            loss = loss + self.run.model.repa.weight * repa
            metrics["repa"] = repa
            metrics["loss"] = loss
        return loss, metrics

    @torch.no_grad()
    def preview(self, model: SemanticistTokenizer, step: int, path: Path) -> None:
        """Reconstructions of fixed held-out images from 1, 2, 4, ... tokens (rows), originals on top."""
        was_training = model.training
        tok = Tokenizer(model, self.codec, self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        recs = tok.reconstruct(self.preview_batch, token_counts(model.num_slots), steps=self.run.preview_steps,
                               generator=generator)
        save_grid([self.preview_batch] + list(recs.values()), path)
        model.train(was_training)


def build(run: TokenizerRun, out_dir: Path, device: torch.device):
    """The task and its training set (checked, nothing written)."""
    train_set = build_dataset(run.data, run.model.image_size, "train", seed=run.train.seed)
    val_set = held_out_dataset(run.data, run.model.image_size, run.train.seed)
    preview = torch.stack([val_set[i][0] for i in range(min(run.preview_images, len(val_set)))]).to(device)
    return TokenizerTask(run, device, preview), lambda world: train_set


SPEC = TaskSpec(kind="tokenizer", run_config=TokenizerRun, build=build)
