"""`semanticist-fast eval recon`: rFID, PSNR and SSIM of a tokenizer's reconstructions of its run's held-out
images, from the first k tokens for each k asked (the published protocol: the 50,000 ImageNet val centre crops,
all tokens, the decoder guidance and steps of the config).

Shard s is chunk s of reconstruction.reconstruct_chunk, the pipeline `reconstruct` shares: everything is scored on
the 8-bit images that are written out (the ADM evaluator's inputs), and shard s decodes with noise seeded by
(seed, s), the same for every k, so the rows of a k-sweep differ only in the tokens they were given; `reconstruct
--batch-size` = eval.shard_size with the same seed reports the same PSNR and SSIM. rFID is against the originals'
own Inception statistics unless eval.reference names an ADM-style .npz.
"""
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..common.device import effective_precision, resolve_device
from ..common.distributed import close, ranks_from_env
from ..common.files import atomic_write_text, sha256_file
from ..common.runs import resolve_checkpoint, saved_config, weights_file
from ..inference.tokenizer_api import Tokenizer
from .eval_config import EvalConfig
from .grid import from_nhwc, save_adm_npz, save_grid, to_uint8
from .inception import fid_statistics, frechet_distance, inception_features, load_inception
from .reconstruction import held_out_set, parse_token_counts, reconstruct_chunk, summarize
from .fid_stats import load_reference
from .sharded import default_out_dir, load_arrays, run_shards, shard_chunks

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SCORES = ("psnr", "ssim")  # per image, beside the Inception features


@torch.no_grad()
def evaluate_reconstruction(checkpoint, cfg: EvalConfig, out_dir: Optional[Path] = None,
                            guidance: Optional[float] = None, steps: Optional[str] = None,
                            device: Optional[str] = None, codec_path: Optional[str] = None,
                            progress: bool = True, precision: str = "bf16") -> Optional[dict]:
    """Runs on every rank; returns the summary on rank 0 (also written to OUT/summary.json), None elsewhere.
    precision: the tokenizer's on a GPU (common/device.py); a run that is not fp32 records it in its identity."""
    start = time.perf_counter()
    ranks = ranks_from_env()
    device = ranks.device(resolve_device(device))
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir else default_out_dir(ckpt, "recon")
    # First: a missing weights file fails before any work. Reconstructions need no logits (no IS).
    net = load_inception(cfg.inception_path, device, cfg.fid_features, logits=False)
    tok = Tokenizer.from_checkpoint(ckpt, device=str(device), codec_path=codec_path, precision=precision)
    counts = sorted(set(parse_token_counts(cfg.tokens, tok.num_slots)))
    dataset = held_out_set(ckpt, tok.image_size)
    n = len(dataset) if cfg.num_images == 0 else min(cfg.num_images, len(dataset))
    guidance = tok.config.diffusion.guidance if guidance is None else float(guidance)
    steps = str(steps or tok.config.diffusion.sample_steps)
    identity = {"kind": "recon", "version": FORMAT_VERSION, "checkpoint_sha256": sha256_file(weights_file(ckpt)),
                "inception_sha256": sha256_file(Path(cfg.inception_path)), "fid_features": cfg.fid_features,
                "data": saved_config(ckpt).get("data"),
                "tokens": counts, "guidance": guidance, "steps": steps, "seed": cfg.seed, "num_items": n,
                "shard_size": cfg.shard_size}
    if effective_precision(device, precision) != "fp32":  # fp32 runs keep the identity of runs before the setting
        identity["precision"] = effective_precision(device, precision)
    scores = [f"flat_{m}" for m in SCORES] + [f"{m}_k{k}" for k in counts for m in SCORES]
    names = ("labels", "real_pool", *scores, *[f"{what}_k{k}" for k in counts for what in ("images", "pool")])

    def make_shard(shard: int, items: range) -> dict:
        pairs = [dataset[i] for i in items]
        images = torch.stack([image for image, _ in pairs])
        reconstructions, scored = reconstruct_chunk(tok, images, counts, cfg.seed, shard, guidance, steps)
        arrays = {"labels": np.array([label for _, label in pairs], dtype=np.int64),
                  "real_pool": inception_features(net, to_uint8(images), cfg.inception_batch)["pool"],
                  **{name: scored[name] for name in scores}}
        for k in counts:
            rec = to_uint8(reconstructions[k])
            arrays[f"images_k{k}"] = rec.permute(0, 2, 3, 1).numpy()
            arrays[f"pool_k{k}"] = inception_features(net, rec, cfg.inception_batch)["pool"]
        return arrays

    shards = out / "shards"
    is_main = run_shards(shards, identity, names, make_shard, ranks, progress, what="reconstructions")
    close()
    if not is_main:
        return None

    small = load_arrays(shards, tuple(name for name in names if not name.startswith("images_")))
    if cfg.reference:
        reference, against = load_reference(cfg.reference, net, cfg.inception_batch), cfg.reference
    else:
        reference, against = fid_statistics(small["real_pool"]), f"the {n} original images"
    flat, rows = summarize(small, counts, SCORES)
    for row in rows:
        row["rfid"] = frechet_distance(fid_statistics(small[f"pool_k{row['tokens']}"]), reference)
    files = {}
    if cfg.write_npz:
        for k in counts:
            files[f"k{k}"] = str(out / f"reconstructions-k{k}.npz")
            save_adm_npz(Path(files[f"k{k}"]), shard_chunks(shards, f"images_k{k}"), small["labels"])
    shown = min(cfg.grid_images, n, cfg.shard_size)  # from the first shard
    grid = [torch.stack([dataset[i][0] for i in range(shown)])]
    grid += [from_nhwc(next(shard_chunks(shards, f"images_k{k}"))[:shown]) for k in counts]
    save_grid(grid, out / "reconstructions.png")
    summary = {"kind": "recon", "checkpoint": str(ckpt), "images": n, "tokens": counts, "guidance": guidance,
               "steps": steps, "seed": cfg.seed, "inception": cfg.inception_path, "fid_features": cfg.fid_features,
               "reference": against,
               "ranks": ranks.world_size, "precision": effective_precision(device, precision), "flat": flat, "per_tokens": rows, "npz": files,
               "grid": str(out / "reconstructions.png"), "seconds": time.perf_counter() - start}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_recon_summary(summary: dict) -> str:
    lines = [f"reconstructions of {summary['images']} held-out images (decoder steps {summary['steps']}, guidance "
             f"{summary['guidance']:g}); rFID against {summary['reference']}; flat = each image its mean colour",
             f"{'tokens':>8}  {'rFID':>9}  {'PSNR dB':>8}  {'vs flat':>8}  {'SSIM':>6}",
             f"{'flat':>8}  {'':>9}  {summary['flat']['psnr']:8.2f}  {0.0:+8.2f}  {summary['flat']['ssim']:6.3f}"]
    for row in summary["per_tokens"]:
        lines.append(f"{row['tokens']:>8}  {row['rfid']:9.3f}  {row['psnr']:8.2f}  {row['psnr_over_flat']:+8.2f}  "
                     f"{row['ssim']:6.3f}")
    lines.append(f"{summary['seconds']:.1f} s; summary in {Path(summary['grid']).parent / 'summary.json'}")
    return "\n".join(lines)
