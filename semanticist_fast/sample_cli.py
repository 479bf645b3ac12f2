"""`semanticist-fast sample`: class-conditional images from an AR checkpoint, as a PNG grid and an .npz."""
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def load_ar(ckpt, device: str):
    from .config import from_dict
    from .engine.checkpoint import load_checkpoint, load_model_state
    from .models.gpt import GPT
    from .train_ar import ARRun

    state = load_checkpoint(ckpt, mmap=True)
    if state.get("kind") != "autoregressive":
        raise ValueError(f"{ckpt} is a {state.get('kind')!r} checkpoint, not an autoregressive one")
    run = from_dict(ARRun, state["config"])
    gpt = GPT(run.model)
    load_model_state(gpt, state["ema"], what=f"checkpoint {ckpt}")
    return gpt.to(device).eval(), run


def parse_classes(spec: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes {spec!r}: expected comma-separated class indices, e.g. --classes 1,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes {spec!r}: classes must be in 0..{num_classes - 1} (this model has {num_classes})")
    return classes


def run_sample(args) -> int:
    from dataclasses import replace

    from .eval.grid import save_grid
    from .tokenizer import Tokenizer
    from .train_ar import sample_images

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpt, run = load_ar(args.ckpt, device)
    classes = parse_classes(args.classes, gpt.num_classes)
    tokenizer = Tokenizer.from_checkpoint(args.tokenizer or run.tokenizer, device=device)
    # Every option left unset falls back to the run's `sample` section.
    given = {name: getattr(args, name) for name in ("cfg", "cfg_schedule", "temperature", "head_steps", "sampler",
                                                    "decoder_cfg", "decoder_steps")}
    s = replace(run.sample, **{name: value for name, value in given.items() if value is not None})
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)], device=device)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = []
    for start in range(0, labels.shape[0], args.batch_size):
        images.append(sample_images(gpt, tokenizer, labels[start:start + args.batch_size], s, generator).cpu())
    images = torch.cat(images)
    out = Path(args.out)
    save_grid(list(images.view(len(classes), args.per_class, *images.shape[1:])), out)
    npz = out.with_suffix(".npz")
    array = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    np.savez(npz, images=array, labels=labels.cpu().numpy())
    log.info("wrote %s (one row per class %s) and %s", out, classes, npz)
    return 0
