"""Small configs and reference data shared by the tests."""
from pathlib import Path

import torch

from semanticist_fast.config import load_config
from semanticist_fast.tasks.tokenizer import TokenizerRun

# The official checkpoints' parameter layouts (copied from shared/reference/checkpoint_layouts).
LAYOUTS = Path(__file__).resolve().parent / "data" / "checkpoint_layouts"


def parse_layout(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) for each tab-separated row of a layout file; '#' lines are comments."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        rows.append((name, dims, getattr(torch, dtype.removeprefix("torch."))))
    return rows


def layout_shapes(file_name: str) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _ in parse_layout(LAYOUTS / file_name)}

MICRO_TOKENIZER = [
    "model.image_size=16",
    "model.encoder.size=custom", "model.encoder.dim=32", "model.encoder.depth=1", "model.encoder.heads=2",
    "model.encoder.patch_size=8", "model.encoder.num_slots=4",
    "model.decoder.size=custom", "model.decoder.depth=1", "model.decoder.hidden=32", "model.decoder.heads=2",
    "model.decoder.patch_size=4",
    "model.nested.enable_nest_after=2",
    "data.num_items=64", "data.num_val_items=8",
    "train.batch_size=8", "train.epochs=2", "train.log_every=1", "train.ckpt_every=4", "train.preview_every=0",
    "train.progress=false", "optim.warmup_epochs=0.25",
    "preview_images=2",
]


def micro_tokenizer_run(*extra: str) -> TokenizerRun:
    return load_config(TokenizerRun, "configs/tokenizer_tiny.yaml", MICRO_TOKENIZER + list(extra))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (adaLN-Zero would make every block the identity and every head output zero);
    norms near 1 and the diffusion head's output layer small, so sampling chains stay tame."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if name.startswith("diffloss.net.final_layer") else (0.2 if p.ndim > 1 else 0.1)
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return model
