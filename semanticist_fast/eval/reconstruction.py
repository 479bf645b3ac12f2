"""How well a tokenizer reconstructs images from its first k tokens: MSE, PSNR and SSIM per k, against the flat
baseline (each image painted its mean colour), which a tokenizer must beat to carry more than colour."""
from typing import Callable, Optional, Sequence

import torch

from ..common.runs import saved_config
from ..config import ConfigError, from_dict
from ..data.build import DataConfig, held_out_dataset
from ..inference.tokenizer import Tokenizer
from .metrics import flat_images, mse, psnr, ssim


def scores(reconstructions: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    return {"mse": mse(reconstructions, images).mean().item(), "psnr": psnr(reconstructions, images).mean().item(),
            "ssim": ssim(reconstructions, images).mean().item()}


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


@torch.no_grad()
def reconstruction_report(tok: Tokenizer, images: torch.Tensor, counts: Sequence[int],
                          guidance: Optional[float] = None, steps: Optional[str] = None, seed: int = 0,
                          batch_size: int = 32, on_count: Optional[Callable[[int, int], None]] = None,
                          step_bars: bool = False, samples: int = 1) -> tuple[dict, dict[int, torch.Tensor]]:
    """(report, {k: reconstructions}). Batch i decodes with noise seeded seed + i * batch_size, the same for every k,
    so the rows differ only in the tokens they were given. on_count(i, k) is called before the i-th count's decode;
    step_bars shows a tqdm bar over each decode's steps. samples: draws averaged per image (Tokenizer.decode)."""
    batches = list(images.split(batch_size))
    tokens = [tok.encode(batch) for batch in batches]
    reconstructions = {}
    for index, k in enumerate(counts):
        if on_count is not None:
            on_count(index, int(k))
        decoded = []
        for i, batch_tokens in enumerate(tokens):
            generator = torch.Generator(tok.device).manual_seed(seed + i * batch_size)
            decoded.append(tok.decode(batch_tokens, num_tokens=k, guidance=guidance, steps=steps,
                                      generator=generator, progress=step_bars, samples=samples).cpu())
        reconstructions[int(k)] = torch.cat(decoded)
    flat = scores(flat_images(images), images)
    rows = []
    for k, rec in reconstructions.items():
        row = {"tokens": k, **scores(rec, images)}
        row["psnr_over_flat"] = row["psnr"] - flat["psnr"]
        rows.append(row)
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
