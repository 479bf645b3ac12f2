"""Regional torch.compile: each transformer block is compiled on its own, not the model as a whole.

Blocks of one kind share their code, so dynamo traces a graph once per kind and reuses it for every layer:
compile time is that of a few blocks, and the glue between blocks (embeddings, nested dropout, the C++ token
ops, the losses) stays eager. Shapes are static (dynamic=False): a training run never changes them.

Dynamo specialises a graph on the Python values a block reads. Stochastic depth keeps its rate in a tensor, so
the ViT's ramp costs two encoder graphs (rate 0 for the first block, rate > 0 for the rest), not one per depth;
train/eval and grad/no-grad are further variants. The per-function recompile limit is raised to cover them, so
fullgraph=True never trips over it.

`Module.compile` leaves the module tree, parameter names and the state dict as they were. Deepcopy drops what
it installs, so the trainer's EMA copy (previews, checkpoints' "ema") runs eagerly.

GPT blocks: the training path (input_pos None) is one graph. The KV-cache decoding path (input_pos given)
compiles into a graph of its own, cache writes included, and matches eager, but every new sampling batch size
recompiles: sample with an uncompiled model (the EMA copy, or one loaded from a checkpoint).
"""
from collections import Counter

import torch
import torch.nn as nn

from ..models.diffusion_head import ResBlock
from ..models.dit import DiTBlock
from ..models.gpt import TransformerBlock
from ..models.layers import FinalLayer
from ..models.vit import EncoderBlock

COMPILED_BLOCKS: tuple[type[nn.Module], ...] = (EncoderBlock, DiTBlock, FinalLayer, TransformerBlock, ResBlock)
GRAPH_VARIANTS = 4  # per block: train / eval x grad / no-grad, each a graph of its own


def compile_blocks(model: nn.Module, fullgraph: bool = True, mode: str | None = None) -> int:
    """Compile, in place, every module of model whose type is in COMPILED_BLOCKS; returns how many.

    fullgraph=True makes a graph break an error instead of a silent slow path. mode: torch.compile's.
    """
    blocks = [m for m in model.modules() if isinstance(m, COMPILED_BLOCKS)]
    for block in blocks:
        block.compile(fullgraph=fullgraph, dynamic=False, mode=mode)
    if blocks:
        # Enough for a graph per block in each variant: the worst case, every layer reading a different number.
        per_kind = max(Counter(type(b) for b in blocks).values())
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, GRAPH_VARIANTS * per_kind)
    return len(blocks)
