"""The data path side by side in one run: decode + crops with the PIL loader vs DALI, and a tokenizer training step
with the online VAE vs the latent cache.

    pip install --no-deps scikit-image   # its bundled photographs, cut into ImageNet-sized JPEGs (nothing imported)
    python benchmarks/bench_data.py                                   # CPU: DALI on the CPU, tiny training shapes
    python benchmarks/bench_data.py --device cuda --preset tokenizer-L --images 2048 --workers 8   # a GPU

1. Decode + crops, images/s over whole epochs of an ImageFolder of JPEGs (random 500 x 375 crops of the
   photographs, quality 90): the torch loader (ImageFolderDataset + DataLoader, `--workers` processes) against
   data.loader=dali (the same batches, DALI with `--workers` threads; on a GPU nvJPEG via device="mixed" and the
   batches on the GPU, the PIL batches copied there too). Two crops: the training crop (random crop + flip at
   `--size`) and the cache build's ten-crop (20 views per image). Every eighth image is 1000 x 750, which the PIL
   path halves with a BOX filter before its bicubic step; the per-pixel difference between the two loaders'
   crops is recorded for both kinds (`tolerance_random_crop_flip`).
2. Training images/s of the tokenizer step (loss, backward, AdamW) with the KL VAE's encoder run online against
   the posterior read from a latent cache (the batch carries mean and log-variance; the VAE encoder is skipped):
   same model, batch and noise. Random weights stand in for the VAE (the cost does not depend on them). Presets:
   tiny (CPU: 64 px, a narrow 5-level VAE, a tiny tokenizer) and tokenizer-L (GPU: ViT-B + DiT-L/2 at 256 px with
   MAR's KL-16 architecture, bf16; REPA off, its teacher being another frozen part).

Baselines: the PIL loader (torchvision-style ImageFolder + DataLoader) is what the reference design and most users
run; the online VAE encoder is the reference's uncached training (its cached mode stores the same posteriors, so the
cached side is what the reference's cache gives too, less its fp32 rebuild on every launch). The variants take turns
(benchmarks/common.py:interleaved); each ratio is the median of the per-round ratios, with its IQR and range.
Appends a record to the results store (benchmarks/results/history.jsonl) unless --no-write; refuses a dirty tree
unless --allow-dirty.
"""
import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semanticist_fast.plan import flops  # noqa: E402
from benchmarks.common import (add_record_arguments, check_clean, describe_device, interleaved,  # noqa: E402
                               ratio_stats, sync, write_result)
from benchmarks.photo_tiles import photo_dir  # noqa: E402
from semanticist_fast.common.noise import BatchNoise  # noqa: E402
from semanticist_fast.data.dali import DaliImages  # noqa: E402
from semanticist_fast.data.folder import ImageFolderDataset  # noqa: E402
from semanticist_fast.data.loader import epoch_loader, rank_batches  # noqa: E402
from semanticist_fast.data.scan import scan_folder  # noqa: E402
from semanticist_fast.data.token_cache import image_views  # noqa: E402
from semanticist_fast.data.transforms import adm_resize_plan, build_transform  # noqa: E402
from semanticist_fast.engine.optimizer import build_adamw  # noqa: E402
from semanticist_fast.models.dit import DecoderConfig  # noqa: E402
from semanticist_fast.models.latent_codec import CodecConfig  # noqa: E402
from semanticist_fast.models.tokenizer import TokenizerConfig  # noqa: E402
from semanticist_fast.models.vae_kl import AutoencoderKL, VAEConfig, save_autoencoder_kl  # noqa: E402
from semanticist_fast.models.vit import EncoderConfig  # noqa: E402
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun, TokenizerTask  # noqa: E402

PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "motorcycle_left.png",
          "ihc.png", "astronaut.png", "motorcycle_right.png")


class OneRank:
    rank, size = 0, 1

    def __init__(self, device):
        self.device = device

    def barrier(self, what):
        pass


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of about ImageNet's median size: random 500 x 375 windows of the photographs, resized."""
    source = photo_dir()
    photos = [Image.open(source / n).convert("RGB") for n in PHOTOS if (source / n).is_file()]
    gen = torch.Generator().manual_seed(seed)
    for k in range(count):
        photo = photos[k % len(photos)]
        scale = float(torch.empty(()).uniform_(0.6, 1.0, generator=gen))
        w, h = max(500, round(photo.width * scale)), max(375, round(photo.height * scale))
        big = photo.resize((w, h), Image.BICUBIC)
        left = int(torch.randint(0, w - 500 + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - 375 + 1, (1,), generator=gen))
        window = big.crop((left, top, left + 500, top + 375))
        if k % 8 == 7:
            window = window.resize((1000, 750), Image.BICUBIC)  # some large ones: the PIL path halves them first
        if k % 4 == 3:
            window = window.transpose(Image.Transpose.ROTATE_90)  # some portraits
        folder = root / f"class{k % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        window.save(folder / f"{k:05d}.jpg", quality=90)
    return root


def pixel_tolerance(folder, dali, batch: int) -> dict:
    """Per image, the mean and max absolute difference (0-255) between DALI's and PIL's random crop + flip, apart for
    the crops PIL resizes in one bicubic step and those it first halves with a BOX filter."""
    regimes = {"one_bicubic_step": [], "box_halvings_first": []}
    batches = rank_batches(len(folder), batch, batch, 1, 0, 0, 0)
    for keys, (xp, _), (xd, _) in zip(batches, epoch_loader(folder, batch, 0, 0), epoch_loader(dali, batch, 0, 0)):
        for (index, seed), a, b in zip(keys, xp, xd):
            w, h = int(dali.scan.width[index]), int(dali.scan.height[index])
            box = folder.transform.box(w, h, torch.Generator().manual_seed(seed))
            halves = bool(adm_resize_plan(w, h, box.short_side)[0])
            d = (a - b.cpu()).abs() * 255
            regimes["box_halvings_first" if halves else "one_bicubic_step"].append((d.mean().item(), d.max().item()))
    return {name: {"crops": len(v), "mean_abs": sum(m for m, _ in v) / len(v), "worst_mean_abs": max(m for m, _ in v),
                   "max_abs": max(x for _, x in v)} for name, v in regimes.items() if v}


def passes(epoch, device: torch.device):
    """One whole pass of `epoch()` (an iterable of (images, ...) batches), the images moved to `device`."""
    def one_pass():
        for batch in epoch():
            batch[0].to(device, non_blocking=True)
    return one_pass


def summarise(wall: dict, cpu: dict, count: int, baseline: str, candidate: str) -> dict:
    """Median images/s (wall and per CPU second) of each variant, and the candidate's per-round speed-up over the
    baseline (median and spread; `<candidate>_over_<baseline>` is its median)."""
    out = {}
    for name in wall:
        out[f"{name}_images_per_s"] = count / median(wall[name])
        out[f"{name}_images_per_cpu_s"] = count / median(cpu[name])
        out[f"{name}_all_seconds"] = wall[name]
    key = f"{candidate}_over_{baseline}"
    out[f"{key}_stats"] = ratio_stats(wall[baseline], wall[candidate])
    out[f"{key}_cpu_stats"] = ratio_stats(cpu[baseline], cpu[candidate])
    out[key] = out[f"{key}_stats"]["median"]
    out[f"{key}_cpu"] = out[f"{key}_cpu_stats"]["median"]
    return out


def compare(epochs: dict, count: int, device: torch.device, repeats: int) -> dict:
    cpu = {}
    wall = interleaved({name: passes(epoch, device) for name, epoch in epochs.items()}, device, repeats, cpu=cpu)
    return summarise(wall, cpu, count, "pil", "dali")


def decode_benchmark(args, device: torch.device) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "images", args.images)
        transform = build_transform("random_crop", args.size, True)
        folder = ImageFolderDataset(root, transform)
        scan_start = time.perf_counter()
        scan = scan_folder(folder.samples, folder.root, Path(tmp) / "scan", OneRank(device), progress=False,
                           threads=args.workers)
        scan_s = time.perf_counter() - scan_start
        dali = DaliImages(folder, scan, transform, device, num_threads=args.workers)
        n = len(folder) // args.batch * args.batch
        pin = device.type == "cuda"
        out["random_crop_flip"] = compare({
            "pil": lambda: epoch_loader(folder, args.batch, 0, 0, num_workers=args.workers, pin_memory=pin),
            "dali": lambda: epoch_loader(dali, args.batch, 0, 0, num_workers=args.workers)}, n, device, args.repeats)
        raw = ImageFolderDataset(root)
        m = min(len(raw), args.ten_crop_images)
        indices = list(range(m))

        def pil_views():
            for k in range(0, m, 4):
                yield (torch.stack([image_views(raw[i][0], "ten_crop", args.size) for i in indices[k:k + 4]]),)

        raw_dali = DaliImages(raw, scan, None, device, num_threads=args.workers)
        out["ten_crop_20_views"] = compare({
            "pil": pil_views,
            "dali": lambda: ((x,) for x in raw_dali.view_batches(indices, "ten_crop", args.size, 4))},
            m, device, args.repeats)
        out["scan_files_per_s"] = len(folder) / scan_s
        out["tolerance_random_crop_flip"] = pixel_tolerance(folder, dali, args.batch)
    return out


def training_shapes(preset: str) -> tuple[TokenizerConfig, VAEConfig]:
    if preset == "tokenizer-L":
        cfg = flops.published_tokenizer_config()
        return replace(cfg, decoder=replace(cfg.decoder, repa_block=0)), VAEConfig()
    # The VAE's share of the step's FLOPs about as at tokenizer-L (0.15 of the trained parts'), at CPU widths.
    vae = VAEConfig(block_out_channels=(8, 16, 16, 32, 32), layers_per_block=1, latent_channels=16,
                    norm_num_groups=4)
    cfg = TokenizerConfig(
        image_size=64,
        encoder=EncoderConfig(size="custom", dim=96, depth=4, heads=4, patch_size=8, num_slots=8),
        decoder=DecoderConfig(size="custom", depth=4, hidden=96, heads=4, patch_size=1, repa_block=0),
        codec=CodecConfig(kind="kl16", path="", latent_channels=16, downsample=16))
    return cfg, vae


def training_benchmark(args, device: torch.device) -> dict:
    cfg, vae_cfg = training_shapes(args.preset)
    bf16 = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_autoencoder_kl(AutoencoderKL(vae_cfg), vae_cfg.to_dict(), tmp)
        cfg = replace(cfg, codec=replace(cfg.codec, path=tmp))
        run = TokenizerRun(model=cfg)
        run.train.precision = "bf16" if bf16 else "fp32"
        torch.manual_seed(0)
        task = TokenizerTask(run, device, None)
    model = task.model.train()
    optimizer = build_adamw(model, 1e-4, (0.9, 0.95), 0.05)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.rand(args.train_batch, 3, cfg.image_size, cfg.image_size, device=device, generator=gen)
    labels = torch.zeros(args.train_batch, dtype=torch.long, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        mean, logvar = task.codec.posterior(images)
    cached = (images, labels, mean.half().float(), logvar.half().float())  # as the cache stores them
    rng = BatchNoise(0, args.train_batch, slice(0, args.train_batch), device)

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task.loss(model, batch, 0, 10 ** 9, rng)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"preset": args.preset, "batch": args.train_batch, "image_size": cfg.image_size,
              "vae_encoder_gflop_per_image": flops.vae_encoder_forward(vae_cfg, cfg.image_size) / 1e9,
              "trained_gflop_per_image": flops.tokenizer_step(cfg, repa=False)["trained_fwd_bwd"] / 1e9}
    cpu = {}
    wall = interleaved({"online": lambda: step((images, labels)), "cached": lambda: step(cached)}, device,
                       args.train_steps, cpu=cpu)
    result.update(summarise(wall, cpu, args.train_batch, "online", "cached"))
    sync(device)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128, help="JPEGs in the decode benchmark's folder")
    p.add_argument("--ten-crop-images", type=int, default=32, help="images of the ten-crop measurement")
    p.add_argument("--size", type=int, default=256, help="crop size")
    p.add_argument("--batch", type=int, default=32, help="loader batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes / DALI threads")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (every variant one pass a round) after one "
                   "warm-up round; the per-round ratios' median counts")
    p.add_argument("--preset", choices=["tiny", "tokenizer-L"], default="tiny", help="training shapes")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=9, help="timed rounds of training steps (one step of each "
                   "variant a round)")
    p.add_argument("--parts", default="decode,train", help="which measurements: decode, train or both")
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    device = torch.device(args.device)
    if device.type == "cpu":
        # One intra-op thread: with more, a CPU that other work shares turns OpenMP's waits into noise (steps
        # 10x apart); the decode side gets its parallelism from --workers, PIL's processes and DALI's threads alike.
        torch.set_num_threads(1)
    record = {"device": describe_device(device), "device_kind": device.type, "size": args.size,
              "images": args.images, "batch": args.batch, "workers": args.workers}
    parts = set(args.parts.split(","))
    if "decode" in parts:
        record["decode"] = decode_benchmark(args, device)
    if "train" in parts:
        record["train"] = training_benchmark(args, device)
    for kind, r in record.get("decode", {}).items():
        if isinstance(r, dict) and "dali_over_pil" in r:
            print(f"{kind:>18}: PIL {r['pil_images_per_s']:8.1f} img/s   DALI {r['dali_images_per_s']:8.1f} img/s   "
                  f"x{r['dali_over_pil']:.2f}   (per CPU second: x{r['dali_over_pil_cpu']:.2f})")
    for regime, r in record.get("decode", {}).get("tolerance_random_crop_flip", {}).items():
        print(f"{regime:>18}: DALI - PIL per pixel (0-255): mean {r['mean_abs']:.2f} (worst image "
              f"{r['worst_mean_abs']:.2f}), max {r['max_abs']:.0f}, over {r['crops']} crops")
    t = record.get("train")
    if t:
        print(f"{'training ' + t['preset']:>18}: online VAE {t['online_images_per_s']:8.1f} img/s   latent cache "
              f"{t['cached_images_per_s']:8.1f} img/s   x{t['cached_over_online']:.2f}   (per CPU second: "
              f"x{t['cached_over_online_cpu']:.2f})")
    if not args.no_write:
        print("wrote", write_result("bench_data", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
