"""Class-conditional generation with epsilon-LlamaGen: the one sampling loop, its loader, and EagerSampler (the
interface the compiled sampler shares). The settings are common/sample_settings.py's SampleConfig.

Static KV cache, the class token prefilled, then one position per step, as the reference samples; our diffusion
head makes one network call per SDE step where the reference's makes two (sampler="sde_naive" reproduces that: the
benchmarks' baseline). use_kv_cache=False re-runs the whole prefix every step, which the reference does not do; it
is kept only as a labelled extra in benchmarks/bench_sample.py and as a check of the cache.
"""
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from ..common.device import inference_precision, resolve_device
from ..common.files import sha256_file
from ..common.runs import weights_file
from ..common.sample_settings import SETTINGS, SampleConfig, tokens_to_generate
from ..config import from_dict, migrate_saved
from ..diffusion.sampling import HeadSamplerName, guidance_at
from ..models.gpt import GPT, GPTConfig
from .load_checkpoint import load_model
from .tokenizer_api import Tokenizer


@torch.no_grad()
def generate(gpt: GPT, labels: torch.Tensor, guidance: float = 1.0,
             guidance_schedule: Literal["linear", "constant"] = "linear", temperature: float = 1.0,
             generator: Optional[torch.Generator] = None, head_steps: Optional[int] = None,
             sampler: HeadSamplerName = "sde", use_kv_cache: bool = True,
             num_tokens: Optional[int] = None) -> torch.Tensor:
    """Sample tokens (B, k, token_dim) float32 for class labels (B,): the first k = num_tokens (default: all N) of
    the model's N tokens, in k AR steps. They equal the first k of a full draw with the same generator (the
    guidance schedule runs over all N).

    guidance != 1 doubles the batch with the null class; both halves share the head's noise. head_steps None
    uses the config's head_sample_steps. The model runs in eval mode here and is restored afterwards.
    """
    guidance_at(guidance, 0, gpt.num_tokens, guidance_schedule)  # fail fast on an unknown schedule name
    gpt.diffloss.sampling.check(sampler)  # ... and on a sampler the head's objective lacks
    count = tokens_to_generate(num_tokens, gpt.num_tokens)
    guided = guidance != 1.0
    batch, num_tokens = labels.shape[0], gpt.num_tokens
    device = labels.device
    all_labels = torch.cat([labels, torch.full_like(labels, gpt.num_classes)]) if guided else labels
    in_dtype = gpt.z_proj.weight.dtype
    tokens = torch.zeros(batch, count, gpt.config.token_dim, device=device)

    was_training = gpt.training
    gpt.eval()
    if use_kv_cache:
        cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else in_dtype
        gpt.setup_caches(all_labels.shape[0], cache_dtype, device)
        positions = torch.arange(num_tokens, device=device)  # built once: no host-to-device copy per token
    try:
        for k in range(count):
            if use_kv_cache:
                prev = None if k == 0 else tokens[:, k - 1:k]
                pos = positions[k:k + 1]
            else:
                prev = None if k == 0 else tokens[:, :k]
                pos = None
            if prev is not None:
                prev = (torch.cat([prev, prev]) if guided else prev).to(in_dtype)
            # Prefill (k = 0) feeds the class token; later steps feed only the newest token when cached.
            step_labels = all_labels if (k == 0 or not use_kv_cache) else None
            cond = gpt(step_labels, prev, pos)[:, -1]
            scale = guidance_at(guidance, k, num_tokens, guidance_schedule) if guided else None
            tokens[:, k] = gpt.diffloss.sample(cond, scale, temperature, generator, head_steps, sampler)
    finally:
        if use_kv_cache:
            gpt.reset_caches()
        gpt.train(was_training)
    return tokens


def sample_images(gpt: GPT, tokenizer: Tokenizer, labels: torch.Tensor, s: SampleConfig,
                  generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Class labels -> images in [0, 1]: the AR model draws its first k tokens (s.tokens; default all N), the
    tokenizer decodes them with the slots after them nulled, as it decodes a prefix in `reconstruct`.
    progress: a tqdm bar over the decoder's steps. Both models run in the tokenizer's precision."""
    with inference_precision(labels.device, tokenizer.precision):
        tokens = generate(gpt, labels, s.guidance, s.guidance_schedule, s.temperature, generator, s.head_steps,
                          s.sampler, num_tokens=s.tokens)
    return tokenizer.decode(tokens, num_tokens=tokens.shape[1], guidance=s.decoder_guidance, steps=s.decoder_steps,
                            generator=generator, progress=progress)


PINNED_TOKENIZER = "tokenizer.safetensors"  # in an AR run directory: the tokenizer it was trained on


@dataclass
class LoadedGenerator:
    gpt: GPT
    sample: SampleConfig  # the run's sampling settings (defaults for a converted checkpoint)
    tokenizer_path: Optional[str]  # the tokenizer the AR model was trained on, if the checkpoint names one
    tokenizer_sha256: Optional[str]  # and the sha256 of its weights, when the run pinned it
    checkpoint: Path  # the checkpoint the weights came from

    def tokenizer_file(self) -> Path:
        """The tokenizer weights this model was trained on: the run's pinned copy, or the file its config names,
        whichever has the recorded sha256. Raises ValueError when none has (pass another tokenizer explicitly)."""
        run_dir = self.checkpoint.parent.parent if self.checkpoint.parent.name == "checkpoints" else None
        candidates = [run_dir / PINNED_TOKENIZER] if run_dir is not None else []
        if self.tokenizer_path:
            try:
                candidates.append(weights_file(self.tokenizer_path))
            except (FileNotFoundError, ValueError):
                pass
        if not self.tokenizer_sha256:  # a converted checkpoint, or one from before tokenizers were pinned
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ValueError(f"{self.checkpoint} names no tokenizer that exists: pass --tokenizer PATH")
            return found
        for candidate in candidates:
            if candidate.is_file() and sha256_file(candidate) == self.tokenizer_sha256:
                return candidate
        raise ValueError(f"{self.checkpoint} was trained on the tokenizer with sha256 {self.tokenizer_sha256[:16]}..., "
                         f"and no file has it now ({', '.join(map(str, candidates)) or 'none named'} differ or are "
                         "missing): decoding with another tokenizer gives other images; pass --tokenizer PATH to do "
                         "it anyway")


def load_generator(path: Union[str, Path], device: Optional[str] = None) -> LoadedGenerator:
    """An AR checkpoint (EMA weights) with the sampling settings and tokenizer its run was trained with."""
    gpt, run_config, checkpoint = load_model(path, "autoregressive", GPTConfig, GPT)
    sample = from_dict(SampleConfig, migrate_saved(SampleConfig, run_config.get("sample", {})), prefix="sample.")
    return LoadedGenerator(gpt.to(resolve_device(device)), sample, run_config.get("tokenizer"),
                           run_config.get("tokenizer_sha256") or None, checkpoint)


def with_overrides(sample: SampleConfig, **given) -> SampleConfig:
    """sample with every given setting that is not None replacing the run's."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown}; choose from {', '.join(SETTINGS)}")
    sample = replace(sample, **{name: value for name, value in given.items() if value is not None})
    sample.validate()
    return sample


class EagerSampler:
    """The AR model and its tokenizer behind the interface of export.CompiledSampler (export/choice.py picks one):
    resolved(**overrides) -> the settings as a dict, sample_images(labels, generator, progress, **overrides)."""

    max_batch = None  # any batch

    def __init__(self, loaded: LoadedGenerator, tokenizer: Tokenizer):
        self.gpt, self.tokenizer, self.sample = loaded.gpt, tokenizer, loaded.sample
        self.settings = asdict(loaded.sample)  # the run's
        self.device = next(loaded.gpt.parameters()).device
        self.num_classes, self.num_tokens = loaded.gpt.num_classes, loaded.gpt.num_tokens

    def config(self, **overrides) -> SampleConfig:
        s = with_overrides(self.sample, **overrides)
        tokens_to_generate(s.tokens, self.num_tokens)  # a k outside 1..N fails before any sampling
        return s

    def resolved(self, **overrides) -> dict:
        return asdict(self.config(**overrides))

    def sample_images(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None, progress: bool = False,
                      **overrides) -> torch.Tensor:
        return sample_images(self.gpt, self.tokenizer, labels, self.config(**overrides), generator, progress)
