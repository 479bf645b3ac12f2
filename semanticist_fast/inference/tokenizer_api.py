"""The user-facing tokenizer: images -> ordered tokens -> images, from a checkpoint."""
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..common.device import check_precision, inference_precision, resolve_device
from ..models.latent_codec import build_codec
from ..models.tokenizer import SemanticistTokenizer, TokenizerConfig, build_decoder_process
from .load_checkpoint import load_model


class Tokenizer:
    def __init__(self, model: SemanticistTokenizer, codec: torch.nn.Module, device: Union[str, torch.device] = "cpu",
                 precision: str = "bf16"):
        """precision: bf16, tf32 or fp32 on a GPU (common/device.py); the CPU always runs fp32."""
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.model = model.to(self.device).eval()
        self.codec = codec.to(self.device).eval()
        self.config: TokenizerConfig = model.cfg
        self.process = build_decoder_process(self.config).to(self.device)
        self._samplers: dict = {}

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: Optional[str] = None,
                        codec_path: Optional[str] = None, precision: str = "bf16") -> "Tokenizer":
        """Load a checkpoint's EMA weights (a run directory: its newest checkpoint that verifies)."""
        def with_codec_path(model_config: dict) -> dict:
            if codec_path is None:
                return model_config
            return {**model_config, "codec": {**model_config["codec"], "path": codec_path}}

        model, _, _ = load_model(path, "tokenizer", TokenizerConfig, SemanticistTokenizer, with_codec_path)
        return cls(model, build_codec(model.cfg.codec), resolve_device(device), precision)

    @property
    def num_slots(self) -> int:
        return self.model.num_slots

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def _sampler(self, steps: str):
        if steps not in self._samplers:
            self._samplers[steps] = self.process.sampler(steps)
        return self._samplers[steps]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], (B, 3, H, W) -> tokens (B, K, D)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"this tokenizer takes {size}x{size} images, got {tuple(images.shape[-2:])}; "
                             f"centre-crop them first (semanticist_fast.data.transforms.center_crop_arr)")
        with inference_precision(self.device, self.precision):
            return self.model.encode(images.to(self.device, torch.float32)).float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, num_tokens: Optional[int] = None, guidance: Optional[float] = None,
               steps: Optional[str] = None, generator: Optional[torch.Generator] = None,
               progress: bool = False, samples: int = 1) -> torch.Tensor:
        """tokens (B, K', D) with K' <= K -> images in [0, 1]. Only the first num_tokens are used; the rest are null.

        guidance: the decoder's classifier-free guidance scale (default: the config's model.diffusion.guidance).
        steps: "250" / "ddim25" (ddpm decoders), "euler4" (flow decoders); default: model.diffusion.sample_steps.
        samples: 1 (the published decode) draws one image from p(image | tokens). M > 1 returns the mean of M draws
        (drawn one after another from the generator), an estimate of E[image | tokens]: the decoder is a diffusion
        model, so one draw's expected squared error is about twice the posterior variance where the mean's is about
        once, which matters when few tokens leave much unsaid. It costs M decodes and is blurrier than a draw.
        """
        if samples < 1:
            raise ValueError(f"samples must be >= 1 (draws averaged per image), got {samples}")
        K, given = self.model.num_slots, tokens.shape[1]
        if given > K:
            raise ValueError(f"this tokenizer has {K} slots, got {given} tokens per image")
        k = given if num_tokens is None else int(num_tokens)
        if not 0 <= k <= given:
            raise ValueError(f"num_tokens must be in [0, {given}] for {given} given tokens, got {k}")
        tokens = tokens.to(self.device, torch.float32)
        if given < K:  # a prefix (e.g. from the AR model): pad; the DiT nulls every slot from k on
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], K - given, tokens.shape[2])], dim=1)
        keep = torch.full((tokens.shape[0],), k, device=self.device, dtype=torch.long)  # nested dropout's keep
        guidance = self.config.diffusion.guidance if guidance is None else guidance
        sample = self._sampler(str(steps or self.config.diffusion.sample_steps))
        dit = self.model.dit
        shape = (tokens.shape[0], dit.in_channels, dit.grid * dit.patch_size, dit.grid * dit.patch_size)
        total = None
        for _ in range(samples):
            noise = torch.randn(shape, device=self.device, generator=generator)
            with inference_precision(self.device, self.precision):
                latents = sample(lambda x, t: dit.forward_guided(x, t, tokens, guidance, keep), noise, generator, progress)
                image = self.codec.decode(latents).float().clamp(0, 1)
            total = image if total is None else total + image
        return total / samples

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, num_tokens: Sequence[int], **decode_kwargs) -> dict[int, torch.Tensor]:
        """Reconstructions from the first k tokens, for each k; the same noise for every k (pass a seeded generator)."""
        tokens = self.encode(images)
        generator = decode_kwargs.pop("generator", None)
        state = generator.get_state() if generator is not None else None
        out = {}
        for k in num_tokens:
            if generator is not None:
                generator.set_state(state)
            out[int(k)] = self.decode(tokens, num_tokens=k, generator=generator, **decode_kwargs)
        return out
