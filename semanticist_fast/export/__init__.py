"""Compiled sampling: AOTInductor packages of the sampler's steps (build.py, steps.py) and the runtime that drives
them (runtime.CompiledSampler), which needs only torch: importing this package loads no model or training code.
"""
from .runtime import CompiledSampler

__all__ = ["CompiledSampler"]
