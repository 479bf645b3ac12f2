"""Do the tiny models draw the shapes of a class, or only its hue? (A trained CNN probe; bench_quality records the
template-matching probe `data.shape_probe`, which names all five types and trains nothing.)

In the built-in data a class fixes both the hue and the type of its two large shapes (disc, square, diamond, ring,
cross: class mod 5). Hue is easy to score (`data.procedural.classify`); shape type needs a probe. This trains a
small CNN to name the shape type from colourless pictures (luminance, standardised per image, so neither the hue
nor the brightness of a class can answer for it) and scores it on:

- `originals`: held-out built-in images (probe trained on training images): how visible the type is at all;
- `reconstructions`: the tokenizer's reconstructions from all tokens (probe trained on reconstructions of training
  images, so that blur is not held against them): how much of the type the tokens carry;
- `samples`: the AR model's samples (same probe), labelled by the class they were drawn for.

Chance is 20 %.

    python benchmarks/shape_probe.py --tokenizer runs/tokenizer_tiny --samples runs/ar_tiny/samples.npz
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_record_arguments, check_clean, describe_device, write_result  # noqa: E402
from semanticist_fast.data.procedural import NUM_SHAPE_TYPES, ProceduralImages, classify  # noqa: E402
from semanticist_fast.inference import Tokenizer  # noqa: E402

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def colourless(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) luminance with zero mean and unit std per image."""
    y = (images.float() * LUMA).sum(1, keepdim=True)
    return (y - y.mean((2, 3), keepdim=True)) / (y.std((2, 3), keepdim=True) + 1e-3)


def probe_net() -> nn.Module:
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())
    return nn.Sequential(block(1, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, NUM_SHAPE_TYPES))


def train_probe(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = probe_net()
    x, y = colourless(images), labels % NUM_SHAPE_TYPES
    steps = epochs * (len(x) // 128)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    for _ in range(steps):
        i = torch.randint(0, len(x), (128,))
        batch = x[i]
        batch = torch.where(torch.rand(len(i), 1, 1, 1) < 0.5, batch, batch.flip(-1))  # every type is mirror-free
        loss = F.cross_entropy(net(batch), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = torch.cat([net(colourless(b)).argmax(-1) for b in images.split(256)])
    return (predicted == labels % NUM_SHAPE_TYPES).float().mean().item()


def built_in(size: int, count: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = ProceduralImages(size, count, split=split)
    items = [data[i] for i in range(count)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def reconstruct_all(tok: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    out = []
    for i, batch in enumerate(images.split(256)):
        out.append(tok.decode(tok.encode(batch), generator=torch.Generator().manual_seed(i)).cpu())
    return torch.cat(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="runs/tokenizer_tiny")
    p.add_argument("--samples", default="runs/ar_tiny/samples.npz", help="an npz written by `semanticist-fast sample`")
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--val-images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=6)
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)

    tok = Tokenizer.from_checkpoint(args.tokenizer, device="cpu")
    size = tok.image_size
    train_x, train_y = built_in(size, args.train_images, "train")
    val_x, val_y = built_in(size, args.val_images, "val")
    with np.load(args.samples) as f:
        samples = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).float() / 255
        sample_y = torch.from_numpy(f["labels"]).long()

    on_originals = train_probe(train_x, train_y, args.epochs)
    on_reconstructions = train_probe(reconstruct_all(tok, train_x), train_y, args.epochs)
    val_reconstructions = reconstruct_all(tok, val_x)
    scores = {
        "originals": accuracy(on_originals, val_x, val_y),
        "reconstructions": accuracy(on_reconstructions, val_reconstructions, val_y),
        "samples": accuracy(on_reconstructions, samples, sample_y),
        "samples_hue": (classify(samples) == sample_y).float().mean().item(),
    }
    print(f"shape type from luminance (chance {1 / NUM_SHAPE_TYPES:.0%}): originals {scores['originals']:.1%}, "
          f"reconstructions from all tokens {scores['reconstructions']:.1%}, AR samples {scores['samples']:.1%} "
          f"({len(samples)}); AR samples' hue matches their class: {scores['samples_hue']:.1%}")
    record = {"device": describe_device(torch.device("cpu")), "device_kind": "cpu", "tokenizer": args.tokenizer,
              "samples": args.samples, "num_samples": len(samples), "epochs": args.epochs, "accuracy": scores}
    if not args.no_write:
        print("wrote", write_result("shape_probe", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
