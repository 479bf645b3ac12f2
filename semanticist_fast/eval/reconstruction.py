"""How well a tokenizer reconstructs images from its first k tokens: MSE, PSNR and SSIM per k, against the flat
baseline (each image painted its mean colour), which a tokenizer must beat to carry more than colour.

One pipeline for `reconstruct`, `eval recon` and the demo (reconstruct_chunk, then summarize): the same images
and seed in the same chunks give the same figures from each."""
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..common.runs import saved_config
from ..common.seeds import derive_seed
from ..config import ConfigError, from_dict
from ..data.datasets import DataConfig, held_out_dataset
from ..inference.tokenizer_api import Tokenizer
from .grid import to_uint8
from .metrics import flat_images, mse, psnr, ssim


def parse_token_counts(spec: str, num_slots: int) -> list[int]:
    """"1,4,16,all" -> [1, 4, 16, num_slots]."""
    counts = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            counts.append(num_slots)
            continue
        try:
            k = int(part)
        except ValueError:
            raise ConfigError(f"tokens: {part!r} is not a number or 'all' (example: --tokens 1,4,16,all)") from None
        if not 1 <= k <= num_slots:
            raise ConfigError(f"tokens: {k} is outside 1..{num_slots} (this tokenizer has {num_slots} slots)")
        counts.append(k)
    return counts


def held_out_set(checkpoint, image_size: int):
    """The held-out (image, label) dataset of the run a checkpoint comes from (the images its previews show): the
    built-in data's val split, or the run's data.val_root in ADM centre crops."""
    config = saved_config(checkpoint)
    data = from_dict(DataConfig, config.get("data") or {}, prefix="data.")
    if "data" not in config or (data.dataset != "procedural" and not data.val_root):
        raise ValueError(f"{checkpoint} names no held-out images (neither the built-in data nor data.val_root): "
                         "pass image files to reconstruct, or train with data.val_root")
    return held_out_dataset(data, image_size, seed=config.get("train", {}).get("seed", 0))


def held_out_images(checkpoint, image_size: int, num_images: int) -> torch.Tensor:
    val = held_out_set(checkpoint, image_size)
    return torch.stack([val[i][0] for i in range(min(num_images, len(val)))])


# The seed stream of the decoder noise: chunk c of a seed decodes from derive_seed(seed, RECON_STREAM, c).
RECON_STREAM = 11
METRICS = ("mse", "psnr", "ssim")  # per image


def as_scored(images: torch.Tensor) -> torch.Tensor:
    """Float images as the 8-bit files hold them: what every reconstruction figure is computed on."""
    return to_uint8(images).float() / 255


def chunk_generator(device, seed: int, chunk: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(derive_seed(seed, RECON_STREAM, chunk))


@torch.no_grad()
def reconstruct_chunk(tok: Tokenizer, images: torch.Tensor, counts: Sequence[int], seed: int, chunk: int,
                      guidance: Optional[float] = None, steps: Optional[str] = None,
                      on_count: Optional[Callable[[int, int], None]] = None,
                      step_bars: bool = False, samples: int = 1) -> tuple[dict[int, torch.Tensor], dict[str, np.ndarray]]:
    """Chunk `chunk` of a scoring run: the one pipeline of `reconstruct`, `eval recon` and the demo.

    Scores are computed on the originals and reconstructions rounded to 8 bits (the files a user keeps and the ADM
    evaluator reads); the decoder noise is seeded by (seed, chunk), the same for every k, so the rows of a k-sweep
    differ only in the tokens they were given. Returns ({k: reconstructions (N, 3, H, W) in [0, 1] on the CPU, as
    decoded}, {name: per-image scores}), the names flat_<metric> and <metric>_k<k> for each metric of METRICS.
    on_count(i, k) is called before the i-th count's decode; step_bars shows a tqdm bar over each decode's steps;
    samples: draws averaged per image (Tokenizer.decode)."""
    originals = as_scored(images)
    tokens = tok.encode(originals)
    scores = _scores("flat", as_scored(flat_images(originals)), originals)
    reconstructions = {}
    for index, k in enumerate(counts):
        if on_count is not None:
            on_count(index, int(k))
        rec = tok.decode(tokens, num_tokens=k, guidance=guidance, steps=steps,
                         generator=chunk_generator(tok.device, seed, chunk), progress=step_bars,
                         samples=samples).cpu()
        reconstructions[int(k)] = rec
        scores.update(_scores(f"k{k}", as_scored(rec), originals))
    return reconstructions, scores


def _scores(what: str, reconstructions: torch.Tensor, originals: torch.Tensor) -> dict[str, np.ndarray]:
    values = {"mse": mse(reconstructions, originals), "psnr": psnr(reconstructions, originals),
              "ssim": ssim(reconstructions, originals)}
    return {(f"flat_{m}" if what == "flat" else f"{m}_{what}"): values[m].cpu().numpy() for m in METRICS}


def summarize(scores: dict[str, np.ndarray], counts: Sequence[int],
              metrics: Sequence[str] = METRICS) -> tuple[dict, list[dict]]:
    """(flat, rows): the mean of each per-image score over every image, for the flat baseline and each k (with the
    PSNR gain over flat). float64 means, so that figures agree however the scores were chunked."""
    def mean(name: str) -> float:
        return float(np.asarray(scores[name], dtype=np.float64).mean())

    flat = {m: mean(f"flat_{m}") for m in metrics}
    rows = []
    for k in counts:
        row = {"tokens": int(k), **{m: mean(f"{m}_k{k}") for m in metrics}}
        row["psnr_over_flat"] = row["psnr"] - flat["psnr"]
        rows.append(row)
    return flat, rows


def reconstruction_report(tok: Tokenizer, images: torch.Tensor, counts: Sequence[int],
                          guidance: Optional[float] = None, steps: Optional[str] = None, seed: int = 0,
                          batch_size: int = 32, on_count: Optional[Callable[[int, int], None]] = None,
                          step_bars: bool = False, samples: int = 1) -> tuple[dict, dict[int, torch.Tensor]]:
    """(report, {k: reconstructions in [0, 1]}) of images decoded batch_size at a time, batch i being chunk i of
    reconstruct_chunk: the figures `eval recon` reports for the same images and seed with eval.shard_size =
    batch_size (its shards are the chunks)."""
    chunks = [reconstruct_chunk(tok, batch, counts, seed, i, guidance, steps, on_count, step_bars, samples)
              for i, batch in enumerate(images.split(batch_size))]
    reconstructions = {int(k): torch.cat([rec[int(k)] for rec, _ in chunks]) for k in counts}
    scores = {name: np.concatenate([s[name] for _, s in chunks]) for name in chunks[0][1]}
    flat, rows = summarize(scores, counts)
    report = {
        "images": len(images),
        "steps": str(steps or tok.config.diffusion.sample_steps),
        "guidance": tok.config.diffusion.guidance if guidance is None else guidance,
        "samples": samples,
        "flat": flat,
        "per_tokens": rows,
    }
    return report, reconstructions


def format_report(report: dict) -> str:
    """The report as a table for the terminal."""
    samples = f", mean of {report['samples']} draws" if report.get("samples", 1) > 1 else ""
    lines = [f"reconstructions of {report['images']} images (decoder steps {report['steps']}, "
             f"guidance {report['guidance']:g}{samples}); flat = each image painted its mean colour",
             f"{'tokens':>8}  {'MSE':>8}  {'PSNR dB':>8}  {'vs flat':>8}  {'SSIM':>6}"]
    flat = report["flat"]
    lines.append(f"{'flat':>8}  {flat['mse']:8.5f}  {flat['psnr']:8.2f}  {0.0:+8.2f}  {flat['ssim']:6.3f}")
    for row in report["per_tokens"]:
        lines.append(f"{row['tokens']:>8}  {row['mse']:8.5f}  {row['psnr']:8.2f}  {row['psnr_over_flat']:+8.2f}  "
                     f"{row['ssim']:6.3f}")
    return "\n".join(lines)
