"""The trainable Semanticist tokenizer: slot encoder -> 16-d standardised tokens -> slot-conditioned DiT.

Frozen parts (the latent codec, the REPA teacher) are not submodules: they never enter the state dict, the
optimizer or the EMA. The parameter names follow the official checkpoints, so conversion is renaming at most.
"""
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn

from ..common.noise import SampleNoise
from ..diffusion import sampling
from ..diffusion.flow import flow_steps
from ..kernels import dispatch
from .dit import DecoderConfig, SlotDiT, repa_loss
from .latent_codec import CodecConfig, codec_geometry
from .nested_dropout import NestedDropout, NestedDropoutConfig
from .vit import EncoderConfig, SlotEncoder


@dataclass
class DiffusionConfig:
    # "ddpm": the published decoder (epsilon prediction, learned variance, 1000 steps). "flow": not in the published
    # design; rectified flow with velocity prediction, which a small decoder learns to condition on far sooner.
    objective: Literal["ddpm", "flow"] = "ddpm"
    num_timesteps: int = 1000  # ddpm
    noise_schedule: str = "linear"  # ddpm
    flow_t_mean: float = 0.0  # flow: training times t = sigmoid(N(mean, std)); t = 0 is noise, negative = noisier
    flow_t_std: float = 1.0
    # decoding, in network calls: "250" ancestral, "ddim25" DDIM, "dpm20" DPM-Solver++(2M) (ddpm); "euler4" Euler,
    # "heun4" Heun, "adams4" Adams-Bashforth 2 (flow)
    sample_steps: str = "250"
    guidance: float = 3.0  # decoder classifier-free guidance used by reconstruct/decode unless given
    RENAMED: ClassVar[dict] = {"cfg": "guidance"}

    def validate(self):
        from ..diffusion.schedules import space_timesteps
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"model.diffusion.noise_schedule={self.noise_schedule!r}; choose 'linear' or 'cosine'")
        try:
            if self.objective == "flow":
                flow_steps(self.sample_steps)
            else:
                space_timesteps(self.num_timesteps, self.sample_steps)
        except ValueError as e:
            raise ValueError(f"model.diffusion.sample_steps={self.sample_steps!r} does not fit objective "
                             f"{self.objective!r}: {e}") from None
        if self.flow_t_std <= 0:
            raise ValueError(f"model.diffusion.flow_t_std must be > 0, got {self.flow_t_std}")


@dataclass
class RepaConfig:
    teacher_path: str = ""  # local DINOv2 ViT-B/14 state dict; empty = REPA off
    weight: float = 1.0


@dataclass
class TokenizerConfig:
    image_size: int = 256
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    nested: NestedDropoutConfig = field(default_factory=NestedDropoutConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def validate(self):
        if self.diffusion.objective == "flow" and self.decoder.learn_sigma:
            raise ValueError("model.diffusion.objective=flow predicts a velocity and no variance: "
                             "set model.decoder.learn_sigma=false")


def build_decoder_process(cfg: TokenizerConfig):
    """This tokenizer's diffusion process (diffusion.sampling.decoder_process from the model.diffusion settings):
    `.training_losses(model_fn, latents)` and `.sampler("250" | "euler4" ...)`."""
    d = cfg.diffusion
    return sampling.decoder_process(d.objective, d.num_timesteps, d.noise_schedule, cfg.decoder.learn_sigma,
                                    d.flow_t_mean, d.flow_t_std)


class SemanticistTokenizer(nn.Module):
    """Owns no parameter itself: each is read inside its submodule's forward (the encoder, encoder2slot, the DiT),
    which is what ZeRO-3 gathers around, so forward_loss may call them one after another."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        channels, latent_size = codec_geometry(cfg.codec, cfg.image_size)
        self.encoder = SlotEncoder(enc, cfg.image_size)
        self.encoder2slot = nn.Linear(enc.resolved()[0], enc.slot_dim)
        self.dit = SlotDiT(cfg.decoder, channels, latent_size, enc.num_slots, enc.slot_dim)
        self.nested = NestedDropout(cfg.nested, enc.num_slots)
        self.num_slots = enc.num_slots

    def encode(self, images: torch.Tensor, rng: Optional[SampleNoise] = None) -> torch.Tensor:
        """images in [0, 1] (B, 3, H, W) -> tokens (B, K, slot_dim), PCA-ordered. rng: training's per-sample draws."""
        return dispatch.standardize_tokens(self.encoder2slot(self.encoder(images, rng)).float())

    def forward_loss(self, images: torch.Tensor, latents: torch.Tensor, process, step: int, epoch: int,
                     repa_target: Optional[torch.Tensor] = None, rng: Optional[SampleNoise] = None):
        """Training loss and metrics {"loss", "mse", ["vb"], ["repa"]} of a batch: encode the images, keep a drawn
        prefix of each sample's tokens (nested dropout), and train the DiT to denoise the images' latents with
        `process` (build_decoder_process: DDPM or rectified flow) given that prefix, plus the REPA alignment of its
        hidden state with the frozen teacher's patch features repa_target (B, G*G, D) when given.

        images in [0, 1] (B, 3, H, W); latents (B, C, h, w) from the frozen codec; step, epoch: when nesting starts.
        rng: the per-sample draws (common/noise.py), in this order: encoder, nested dropout, diffusion.
        """
        tokens = self.encode(images, rng)
        keep = self.nested.sample_keep(images.shape[0], step, epoch, images.device, rng)
        projected = {}

        def denoiser(x_t, timesteps):
            if repa_target is None:
                return self.dit(x_t, timesteps, tokens, keep)
            out, projected["repa"] = self.dit(x_t, timesteps, tokens, keep, return_repa=True)
            return out

        terms = process.training_losses(denoiser, latents, rng=rng)
        loss = terms["loss"].mean()
        metrics = {"loss": loss, "mse": terms["mse"].mean()}
        if "vb" in terms:
            metrics["vb"] = terms["vb"].mean()
        if repa_target is not None:
            if projected["repa"] is None:
                raise ValueError(f"a REPA target was given, but model.decoder.repa_block={self.cfg.decoder.repa_block} "
                                 f"is outside the DiT's {len(self.dit.blocks)} blocks (no projector): set it in "
                                 f"1..{len(self.dit.blocks)}, or leave model.repa.teacher_path empty")
            metrics["repa"] = repa_loss(projected["repa"], repa_target).mean()
            loss = loss + self.cfg.repa.weight * metrics["repa"]
        metrics["loss"] = loss
        return loss, metrics
