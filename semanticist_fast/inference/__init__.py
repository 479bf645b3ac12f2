"""The public inference API: tokenizer encode / decode / reconstruct, and class-conditional image generation.

Stands on models and diffusion alone (no training code), so evaluation, export and demos can build on it.
"""
from .generation import EagerSampler, SampleConfig, generate, load_generator, sample_images
from .tokenizer_api import Tokenizer

__all__ = ["EagerSampler", "SampleConfig", "Tokenizer", "generate", "load_generator", "sample_images"]
