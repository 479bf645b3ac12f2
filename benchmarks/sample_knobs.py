"""What limits the tiny AR samples' shapes? The sampling-time knobs, varied one at a time from the run's own settings
(same seed, same class-balanced labels), each scored by hue (`data.procedural.classify`) and by the shape probe
(`data.shape_probe`), beside the probe on the tokenizer's reconstructions of held-out images from all tokens (what the
tokens can carry at best).

    python benchmarks/sample_knobs.py --ar runs/ar_tiny

Appends a record to the results store unless --no-write.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_record_arguments, check_clean, describe_device, write_result  # noqa: E402
from semanticist_fast.common.runs import resolve_checkpoint  # noqa: E402
from semanticist_fast.data.procedural import ProceduralImages, classify  # noqa: E402
from semanticist_fast.data.shape_probe import shape_accuracy  # noqa: E402
from semanticist_fast.inference import Tokenizer, load_generator, sample_images  # noqa: E402

# name -> SampleConfig fields changed from the run's settings
VARIANTS = {
    "run settings": {},
    "guidance 1 (none)": {"guidance": 1.0},
    "guidance 2": {"guidance": 2.0},
    "guidance 8": {"guidance": 8.0},
    "guidance 4 constant": {"guidance": 4.0, "guidance_schedule": "constant"},
    "temperature 0.7": {"temperature": 0.7},
    "temperature 0.4": {"temperature": 0.4},
    "head steps 200": {"head_steps": 200},
    "head sampler ode": {"sampler": "ode"},
    "guidance 8 constant, temperature 0.4": {"guidance": 8.0, "guidance_schedule": "constant", "temperature": 0.4},
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", default="runs/ar_tiny")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--num-images", type=int, default=200, help="held-out images reconstructed for the ceiling")
    p.add_argument("--seed", type=int, default=0)
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    loaded = load_generator(args.ar, "cpu")
    tok = Tokenizer.from_checkpoint(loaded.tokenizer_path, device="cpu")
    classes = loaded.gpt.num_classes
    labels = torch.arange(classes * args.per_class) % classes

    images, truth = ProceduralImages(tok.image_size, args.num_images, split="val").get_batch(range(args.num_images))
    with torch.no_grad():
        recon = torch.cat([tok.decode(tok.encode(b), generator=torch.Generator().manual_seed(i))
                           for i, b in enumerate(images.split(100))])
    record = {"device": describe_device(torch.device("cpu")), "device_kind": "cpu",
              "ar": str(resolve_checkpoint(args.ar)), "samples_per_variant": len(labels),
              "run_settings": dataclasses.asdict(loaded.sample),
              "originals_shape_accuracy": shape_accuracy(images, truth),
              "reconstructions_shape_accuracy": shape_accuracy(recon, truth), "variants": []}
    print(f"shape probe: originals {record['originals_shape_accuracy']:.1%}, reconstructions from all tokens "
          f"{record['reconstructions_shape_accuracy']:.1%}")
    for name, change in VARIANTS.items():
        s = dataclasses.replace(loaded.sample, **change)
        start = time.perf_counter()
        samples = torch.cat([sample_images(loaded.gpt, tok, b, s, torch.Generator().manual_seed(args.seed + i))
                             for i, b in enumerate(labels.split(100))])
        row = {"variant": name, **change, "hue_accuracy": (classify(samples, classes) == labels).float().mean().item(),
               "shape_accuracy": shape_accuracy(samples, labels), "seconds": time.perf_counter() - start}
        record["variants"].append(row)
        print(f"{name:>40}: hue {row['hue_accuracy']:.1%}, shape {row['shape_accuracy']:.1%} ({row['seconds']:.1f} s)")
    if not args.no_write:
        print("wrote", write_result("sample_knobs", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
