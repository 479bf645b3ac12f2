"""make_sampler: the one place that picks the eager sampler (an AR checkpoint and its tokenizer) or the compiled one
(an exported directory). Both take the SampleConfig settings as overrides of their own defaults, answer
resolved(**overrides) (the settings as a dict; bad ones fail before any sampling) and
sample_images(labels, generator, progress, **overrides), and name their device, num_classes, num_tokens and
max_batch (None: any), so `semanticist-fast sample`, the demo and the benchmarks drive either alike.
"""
from pathlib import Path
from typing import Optional, Union

from ..inference import EagerSampler, Tokenizer, load_generator
from ..inference.generation import LoadedGenerator
from .runtime import CompiledSampler

Sampler = Union[EagerSampler, CompiledSampler]


def make_sampler(ar: Union[str, Path, LoadedGenerator, None] = None, compiled: Union[str, Path, None] = None,
                 tokenizer: Union[str, Path, Tokenizer, None] = None, device: Optional[str] = None,
                 precision: str = "bf16") -> Sampler:
    """ar: an AR run directory, checkpoint or loaded generator; compiled: an exported directory; exactly one.
    The eager sampler decodes with tokenizer (a path or a loaded Tokenizer; default: the one the AR model was
    trained on, pinned by sha256) on device, in precision; an export fixed all three for itself."""
    if (ar is None) == (compiled is None):
        raise ValueError("give an AR checkpoint or an exported directory to sample with, not both or neither")
    if compiled is not None:
        return CompiledSampler.load(compiled)
    loaded = ar if isinstance(ar, LoadedGenerator) else load_generator(ar, device)
    if not isinstance(tokenizer, Tokenizer):
        gpt_device = next(loaded.gpt.parameters()).device
        tokenizer = Tokenizer.from_checkpoint(tokenizer or loaded.tokenizer_file(), device=str(gpt_device),
                                              precision=precision)
    return EagerSampler(loaded, tokenizer)
