"""The trainable Semanticist tokenizer: slot encoder -> 16-d standardised tokens -> slot-conditioned DiT.

Frozen parts (the latent codec, the REPA teacher) are not submodules: they never enter the state dict, the
optimizer or the EMA. The parameter names follow the official checkpoints, so conversion is renaming at most.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..kernels import dispatch
from .dit import DecoderConfig, SlotDiT
from .latent_codec import CodecConfig, codec_geometry
from .nested_dropout import NestedDropout, NestedDropoutConfig
from .vit import EncoderConfig, SlotEncoder


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    noise_schedule: str = "linear"
    sample_steps: str = "250"  # respacing for decoding: "250" ancestral, "ddim25" DDIM
    cfg: float = 3.0  # decoder guidance used by reconstruct/decode unless given

    def validate(self):
        from ..diffusion.schedules import space_timesteps
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"model.diffusion.noise_schedule={self.noise_schedule!r}; choose 'linear' or 'cosine'")
        space_timesteps(self.num_timesteps, self.sample_steps)


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


class SemanticistTokenizer(nn.Module):
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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] (B, 3, H, W) -> tokens (B, K, slot_dim), PCA-ordered."""
        return dispatch.standardize_tokens(self.encoder2slot(self.encoder(images)).float())

    def condition(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Tokens with positions >= keep[b] replaced by the decoder's learned null slots."""
        return self.nested.apply(tokens, self.dit.null_cond, keep)

    def prefix_condition(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        keep = torch.full((tokens.shape[0],), num_tokens, device=tokens.device, dtype=torch.long)
        return self.condition(tokens, keep)
