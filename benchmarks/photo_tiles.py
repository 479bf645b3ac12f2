"""The tiny tokenizer recipe on real photographs, with held-out photos it never saw.

    pip install --no-deps scikit-image      # only for its bundled photographs; nothing of it is imported
    python benchmarks/photo_tiles.py --out runs/photo_tiles

1. Cuts 48 px tiles, at two scales, from the photographs that scikit-image ships in its wheel (skimage/data):
   a training ImageFolder from some photos and a held-out one from others (rocket.jpg and coffee.png).
2. Trains configs/tokenizer_tiny.yaml on the training tiles (data.dataset=folder; random crops + flips to 32 px),
   for about as many optimizer steps as the built-in demo takes. Every training tile is also saved with its channels
   cycled twice (GBR, BRG: hues turned by 120 and 240 degrees; --colour-rotations 1 turns this off): thirteen photos
   hold too few colours, and without it the held-out rocket's deep-blue sky decodes teal at every k and one token
   scores below the flat image (benchmarks/results/README.md). The built-in data spans the hue circle already.
3. Reconstructs the held-out tiles (ADM centre crops) from 1, 2, 4 and all tokens: MSE / PSNR / SSIM against the
   flat mean-colour baseline, decoded as published (one draw: `report`) and as the mean of --decode-samples draws
   (`mean_report`: an estimate of E[image | first k tokens], which a single draw misses by about the posterior
   variance again); writes grid PNGs and a record in the results store.
"""
import argparse
import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_record_arguments, check_clean, describe_device, write_result  # noqa: E402
from semanticist_fast.common.files import atomic_write_text  # noqa: E402
from semanticist_fast.config import load_config  # noqa: E402
from semanticist_fast.eval.grid import save_grid, token_counts  # noqa: E402
from semanticist_fast.eval.reconstruction import format_report, held_out_images, reconstruction_report  # noqa: E402
from semanticist_fast.inference import Tokenizer  # noqa: E402
from semanticist_fast.tasks import train  # noqa: E402
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun  # noqa: E402

TRAIN_PHOTOS = ("astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png",
                "grass.png", "gravel.png")
HELD_OUT_PHOTOS = ("rocket.jpg", "coffee.png")
TILE, TRAIN_SHORT_SIDES, TRAIN_STRIDE, VAL_SHORT_SIDE = 48, (128, 256), 16, 160


def photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is not installed: pip install --no-deps scikit-image (for its photographs)")
    return Path(spec.submodule_search_locations[0]) / "data"


def cut_tiles(photo: Path, out_dir: Path, short_sides, stride: int, colour_rotations: int = 1) -> int:
    """Tiles of TILE px every `stride` px, from the photo resized to each short side; returns how many.
    colour_rotations 3: each tile also with its channels cycled (RGB -> GBR -> BRG), hues turned by 120 degrees."""
    image = Image.open(photo).convert("RGB")
    count = 0
    for short in short_sides:
        scale = short / min(image.size)
        resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        for top in range(0, resized.height - TILE + 1, stride):
            for left in range(0, resized.width - TILE + 1, stride):
                tile = resized.crop((left, top, left + TILE, top + TILE))
                channels = tile.split()
                for turn in range(colour_rotations):
                    turned = Image.merge("RGB", channels[turn:] + channels[:turn])
                    turned.save(out_dir / f"{short}-{top}-{left}{f'-c{turn}' if turn else ''}.png")
                    count += 1
    return count


def make_image_folders(root: Path, colour_rotations: int = 1) -> tuple[Path, Path, dict]:
    source = photo_dir()
    counts = {}
    for split, photos, sides, stride, turns in (
            ("train", TRAIN_PHOTOS, TRAIN_SHORT_SIDES, TRAIN_STRIDE, colour_rotations),
            ("val", HELD_OUT_PHOTOS, (VAL_SHORT_SIDE,), TILE, 1)):
        for name in photos:
            folder = root / split / Path(name).stem
            folder.mkdir(parents=True, exist_ok=True)
            counts[f"{split}/{name}"] = cut_tiles(source / name, folder, sides, stride, turns)
    return root / "train", root / "val", counts


def counts_val(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k.startswith("val/"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/photo_tiles")
    p.add_argument("--config", default="configs/tokenizer_tiny.yaml")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: those of the built-in demo)")
    p.add_argument("--num-images", type=int, default=64, help="held-out tiles to reconstruct")
    p.add_argument("--decode-samples", type=int, default=4, help="draws averaged per image for mean_report")
    p.add_argument("--colour-rotations", type=int, choices=(1, 3), default=3,
                   help="3: train on every tile in three colour rotations (channels cycled), about the same steps")
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    train_root, val_root, counts = make_image_folders(out / "tiles", args.colour_rotations)
    num_train = sum(v for k, v in counts.items() if k.startswith("train/"))
    demo = load_config(TokenizerRun, args.config)
    steps = args.steps or demo.train.epochs * (demo.data.num_items // demo.train.batch_size)
    epochs = max(1, math.ceil(steps * demo.train.batch_size / num_train))
    run = load_config(TokenizerRun, args.config, [
        "data.dataset=folder", f"data.root={train_root}", f"data.val_root={val_root}", f"train.epochs={epochs}",
        "train.preview_every=0", "train.progress=false"])
    train(run, out / "run", resume=True)  # a run cut short continues; a finished one returns at once

    tok = Tokenizer.from_checkpoint(out / "run")
    images = held_out_images(out / "run", tok.image_size, num_images=10 ** 6)
    images = images[torch.linspace(0, len(images) - 1, min(args.num_images, len(images))).long()]  # both photos
    report, reconstructions = reconstruction_report(tok, images, token_counts(tok.num_slots))
    mean_report, means = reconstruction_report(tok, images, token_counts(tok.num_slots), samples=args.decode_samples)
    print(format_report(report))
    print(format_report(mean_report))
    shown = torch.linspace(0, len(images) - 1, min(12, len(images))).long()  # from both photos
    save_grid([images[shown]] + [r[shown] for r in reconstructions.values()], out / "held_out.png")
    save_grid([images[shown]] + [r[shown] for r in means.values()], out / "held_out_mean.png")
    record = {"device": describe_device(torch.device("cpu")), "device_kind": "cpu", "config": args.config,
              "train_tiles": num_train, "held_out_tiles": counts_val(counts), "epochs": epochs,
              "colour_rotations": args.colour_rotations,
              "train_photos": list(TRAIN_PHOTOS), "held_out_photos": list(HELD_OUT_PHOTOS), "report": report,
              "mean_report": mean_report}
    if not args.no_write:
        print("wrote", write_result("photo_tiles", record, allow_dirty=args.allow_dirty))
    atomic_write_text(out / "report.json", json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
