"""Generation from the first k tokens (`sample --tokens k`): time per image and how well the samples draw their
class (hue: `data.procedural.classify`; shape group: `data.shape_probe`) for each k, side by side in one run.

Every k samples the same class-balanced labels with the same seeds, in rounds that rotate through the ks
(benchmarks/common.py:interleaved): round r draws chunk r of the labels for every k, so load from elsewhere hits
every k alike. Time per image is each k's median over the timed rounds (the first round warms up, untimed, its images
still scored); the ratio is all N tokens' seconds over k's, per round. Beside each k: the hue and shape accuracy of
the tokenizer's reconstructions of held-out images from their first k tokens (what k tokens can carry at best).

    python benchmarks/sample_tokens.py --ar runs/ar_tiny [--compiled runs/ar_tiny_export] [--tokens 1,2,4,all]

Appends a record to the results store unless --no-write.
"""
import argparse
import sys
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (add_record_arguments, check_clean, describe_device, interleaved,  # noqa: E402
                               ratio_stats, write_result)
from semanticist_fast.common.runs import resolve_checkpoint  # noqa: E402
from semanticist_fast.data.procedural import classify  # noqa: E402
from semanticist_fast.data.shape_probe import shape_accuracy  # noqa: E402
from semanticist_fast.eval.grid import token_counts  # noqa: E402
from semanticist_fast.eval.reconstruction import held_out_set, parse_token_counts  # noqa: E402
from semanticist_fast.export.choice import make_sampler  # noqa: E402
from semanticist_fast.inference import Tokenizer  # noqa: E402


def hue_accuracy(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    return (classify(images, num_classes) == labels).float().mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", default="runs/ar_tiny", help="AR run (its tokenizer decodes; eager sampling)")
    p.add_argument("--compiled", default=None, help="an export of it: sample with the compiled sampler instead")
    p.add_argument("--tokens", default=None, help="the ks, e.g. 1,2,4,all (default: 1, 2, 4, ... all)")
    p.add_argument("--per-class", type=int, default=20, help="samples per class for each k")
    p.add_argument("--chunk", type=int, default=20, help="images per call: one round samples one chunk for every k")
    p.add_argument("--num-images", type=int, default=200, help="held-out images reconstructed for each k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    torch.set_num_threads(args.threads)
    sampler = make_sampler(args.ar if args.compiled is None else None, args.compiled, device="cpu")
    n, classes = sampler.num_tokens, sampler.num_classes
    ks = sorted(set(parse_token_counts(args.tokens, n) if args.tokens else token_counts(n)))
    labels = torch.arange(classes * args.per_class) % classes
    chunks = list(labels.split(min(args.chunk, sampler.max_batch or args.chunk)))
    drawn = {k: [] for k in ks}

    def variant(k: int):
        def call():
            r = len(drawn[k])  # this k's next chunk, with its own seed: the same images whatever the order
            generator = torch.Generator().manual_seed(args.seed + r)
            drawn[k].append(sampler.sample_images(chunks[r], generator, tokens=k).cpu())
        return call

    seconds = interleaved({f"k={k}": variant(k) for k in ks}, torch.device("cpu"), rounds=len(chunks) - 1)
    per_image = {k: [s / len(chunks[r + 1]) for r, s in enumerate(seconds[f"k={k}"])] for k in ks}

    # The ceiling of each k: held-out originals reconstructed from their first k tokens (same decoder, same noise).
    tok = sampler.tokenizer if hasattr(sampler, "tokenizer") else Tokenizer.from_checkpoint(
        sampler.manifest["checkpoints"]["tokenizer"]["path"], device="cpu")
    held_out = held_out_set(args.ar, tok.image_size)  # the AR run's data: its held-out split
    items = [held_out[i] for i in range(min(args.num_images, len(held_out)))]
    val, truth = torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
    reconstructions = {k: [] for k in ks}
    for i, batch in enumerate(val.split(100)):
        for k, images in tok.reconstruct(batch, ks, generator=torch.Generator().manual_seed(i)).items():
            reconstructions[k].append(images)

    rows = []
    for k in ks:
        samples = torch.cat(drawn[k])
        rec = torch.cat(reconstructions[k])
        rows.append({"tokens": k, "ar_steps": k, "seconds_per_image": median(per_image[k]),
                     "ms_per_image": 1e3 * median(per_image[k]),
                     "images_per_s": 1 / median(per_image[k]), "all_seconds_per_image": per_image[k],
                     "speedup_over_all_tokens": ratio_stats(per_image[n], per_image[k]),
                     "hue_accuracy": hue_accuracy(samples, labels, classes),
                     "shape_accuracy": shape_accuracy(samples, labels),
                     "reconstruction_hue_accuracy": hue_accuracy(rec, truth, classes),
                     "reconstruction_shape_accuracy": shape_accuracy(rec, truth)})
    record = {"device": describe_device(torch.device("cpu")), "device_kind": "cpu",
              "ar": str(resolve_checkpoint(args.ar)), "sampler": "compiled" if args.compiled else "eager",
              "num_tokens": n, "samples_per_k": len(labels), "chunk": len(chunks[0]), "timed_rounds": len(chunks) - 1,
              "settings": sampler.resolved(), "held_out_images": len(items),
              "originals_shape_accuracy": shape_accuracy(val, truth),
              "originals_hue_accuracy": hue_accuracy(val, truth, classes), "per_k": rows}
    print(f"{len(labels)} samples per k ({record['sampler']}), {len(items)} held-out images; originals: hue "
          f"{record['originals_hue_accuracy']:.1%}, shape {record['originals_shape_accuracy']:.1%}")
    print(f"{'k':>4} {'ms/image':>9} {'vs all':>7} {'hue':>7} {'shape':>7} | reconstructions: {'hue':>7} {'shape':>7}")
    for row in rows:
        print(f"{row['tokens']:>4} {row['seconds_per_image'] * 1e3:>9.1f} "
              f"{'x%.2f' % row['speedup_over_all_tokens']['median']:>7} {row['hue_accuracy']:>7.1%} "
              f"{row['shape_accuracy']:>7.1%} | {'':>17}{row['reconstruction_hue_accuracy']:>7.1%} "
              f"{row['reconstruction_shape_accuracy']:>7.1%}")
    if not args.no_write:
        print("wrote", write_result("sample_tokens", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
