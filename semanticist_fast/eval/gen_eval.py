"""`semanticist-fast eval gen`: gFID and IS of class-balanced samples from an AR checkpoint (the published
protocol: 50 samples for each of the 1,000 ImageNet classes, against the ADM reference batch's statistics).

Sample i has label i mod num_classes, so every prefix of the run, and every shard of num_classes items, is balanced.
Shard s is one batch sampled with a generator seeded by (seed, s): each sample is a pure function of the seed, the
shard size and its index, whichever rank makes it and whether or not the run was resumed. The sampling settings are
the run's `sample` section with the given overrides. Without eval.reference, FID is against the statistics of the
run's own training images (cached; as many as samples unless eval.reference_images says otherwise).
"""
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..common.device import effective_precision, resolve_device
from ..common.distributed import close, ranks_from_env
from ..common.files import atomic_write_text, sha256_file
from ..common.runs import resolve_checkpoint, saved_config, weights_file
from ..common.sample_settings import tokens_to_generate
from ..common.seeds import derive_seed
from ..inference.generation import load_generator, sample_images, with_overrides
from ..inference.tokenizer_api import Tokenizer
from .eval_config import EvalConfig
from .grid import from_nhwc, save_adm_npz, save_grid, to_uint8
from .inception import fid_statistics, frechet_distance, inception_features, inception_score, load_inception
from .fid_stats import data_reference, load_reference
from .sharded import default_out_dir, load_arrays, run_shards, shard_chunks

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_SAMPLE_STREAM = 13  # the seed stream of the sampling noise
NAMES = ("images", "labels", "pool", "logits")


def sample_labels(items: range, num_classes: int) -> torch.Tensor:
    return torch.tensor(list(items), dtype=torch.long) % num_classes


@torch.no_grad()
def evaluate_generation(checkpoint, cfg: EvalConfig, out_dir: Optional[Path] = None,
                        tokenizer_path: Optional[str] = None, device: Optional[str] = None,
                        progress: bool = True, precision: str = "bf16", **sample_overrides) -> Optional[dict]:
    """Runs on every rank; returns the summary on rank 0 (also written to OUT/summary.json), None elsewhere.
    precision: of the sampling on a GPU (common/device.py); a run that is not fp32 records it in its identity.
    sample_overrides: SampleConfig fields (guidance, temperature, head_steps, ...); None keeps the run's."""
    start = time.perf_counter()
    ranks = ranks_from_env()
    device = ranks.device(resolve_device(device))
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir else default_out_dir(ckpt, "gen")
    net = load_inception(cfg.inception_path, device, cfg.fid_features)  # first: a missing file fails before the work
    loaded = load_generator(ckpt, str(device))
    tokenizer_file = weights_file(tokenizer_path) if tokenizer_path else loaded.tokenizer_file()  # the pinned one
    tokenizer = Tokenizer.from_checkpoint(tokenizer_file, device=str(device), precision=precision)
    gpt, sample = loaded.gpt, with_overrides(loaded.sample, **sample_overrides)
    tokens_to_generate(sample.tokens, gpt.num_tokens)  # a k outside 1..N fails before the work
    run = saved_config(ckpt)
    if not cfg.reference and not run.get("data"):  # checked before sampling, not after
        raise ValueError(f"{ckpt} names no training data to take reference statistics from (a converted "
                         "checkpoint?): pass --reference with an ADM-style .npz")
    num_classes = gpt.num_classes
    n = cfg.per_class * num_classes
    if n < cfg.is_splits:
        raise ValueError(f"{n} samples cannot make eval.is_splits={cfg.is_splits} IS splits: raise eval.per_class")
    inception_sha = sha256_file(Path(cfg.inception_path))
    settings = asdict(sample)
    if settings["tokens"] is None:  # all tokens: the identity of runs from before the setting, so they resume
        del settings["tokens"]
    identity = {"kind": "gen", "version": FORMAT_VERSION, "checkpoint_sha256": sha256_file(weights_file(ckpt)),
                "tokenizer_sha256": sha256_file(tokenizer_file), "inception_sha256": inception_sha,
                "fid_features": cfg.fid_features, "sample": settings, "seed": cfg.seed,
                "num_classes": num_classes, "num_items": n, "shard_size": cfg.shard_size}
    if effective_precision(device, precision) != "fp32":  # fp32 runs keep the identity of runs before the setting
        identity["precision"] = effective_precision(device, precision)

    def make_shard(shard: int, items: range) -> dict:
        labels = sample_labels(items, num_classes)
        generator = torch.Generator(device).manual_seed(derive_seed(cfg.seed, _SAMPLE_STREAM, shard))
        images = to_uint8(sample_images(gpt, tokenizer, labels.to(device), sample, generator))
        features = inception_features(net, images, cfg.inception_batch)
        return {"images": images.permute(0, 2, 3, 1).numpy(), "labels": labels.numpy(), "pool": features["pool"],
                "logits": features["logits"]}

    shards = out / "shards"
    is_main = run_shards(shards, identity, NAMES, make_shard, ranks, progress, what="samples")
    close()
    if not is_main:
        return None

    arrays = load_arrays(shards, ("labels", "pool", "logits"))
    if cfg.reference:
        reference, against = load_reference(cfg.reference, net, cfg.inception_batch), cfg.reference
    else:
        reference, against = data_reference(run["data"], tokenizer.image_size, cfg.reference_images or n,
                                            net, inception_sha, out.parent, run.get("train", {}).get("seed", 0),
                                            cfg.inception_batch, progress)
    is_mean, is_std = inception_score(arrays["logits"], cfg.is_splits)
    files = {}
    if cfg.write_npz:
        files["samples"] = str(out / "samples.npz")
        save_adm_npz(Path(files["samples"]), shard_chunks(shards, "images"), arrays["labels"])
    save_grid(_class_rows(shards, cfg.shard_size, num_classes, cfg.per_class, cfg.grid_images), out / "samples.png")
    summary = {"kind": "gen", "checkpoint": str(ckpt), "tokenizer": str(tokenizer_file), "samples": n,
               "per_class": cfg.per_class, "classes": num_classes, "sample": asdict(sample), "seed": cfg.seed,
               "inception": cfg.inception_path, "fid_features": cfg.fid_features, "reference": against,
               "ranks": ranks.world_size, "precision": effective_precision(device, precision),
               "gfid": frechet_distance(fid_statistics(arrays["pool"]), reference), "is_mean": is_mean,
               "is_std": is_std, "npz": files, "grid": str(out / "samples.png"),
               "seconds": time.perf_counter() - start}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _class_rows(shards: Path, shard_size: int, num_classes: int, per_class: int, per_row: int) -> list[torch.Tensor]:
    """The first samples of the first (up to 10) classes, a row per class, read from the memory-mapped store."""
    chunks = list(shard_chunks(shards, "images"))
    rows = []
    for c in range(min(num_classes, 10)):
        picked = [c + j * num_classes for j in range(min(per_row, per_class))]
        rows.append(from_nhwc(np.stack([chunks[i // shard_size][i % shard_size] for i in picked])))
    return rows


def format_gen_summary(summary: dict) -> str:
    s = summary["sample"]
    return "\n".join([
        f"{summary['samples']} samples ({summary['per_class']} for each of {summary['classes']} classes; guidance "
        f"{s['guidance']:g} {s['guidance_schedule']}, temperature {s['temperature']:g}, seed {summary['seed']}"
        + (f"; the first {s['tokens']} tokens" if s.get("tokens") else "") + ")",
        f"gFID {summary['gfid']:.3f} against {summary['reference']}",
        f"IS {summary['is_mean']:.3f} +- {summary['is_std']:.3f}",
        f"{summary['seconds']:.1f} s; samples in {summary['npz'].get('samples', '(not written)')}, "
        f"summary in {Path(summary['grid']).parent / 'summary.json'}",
    ])
