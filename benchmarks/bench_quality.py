"""The tiny pipeline's quality at this commit, from trained run directories (it trains nothing):

- the tokenizer: PSNR / SSIM of held-out reconstructions from the first k tokens, for k = 1, 2, 4, ... all, beside
  the flat mean-colour baseline (the `reconstruct` report);
- the AR model: class-balanced samples scored by hue (`data.procedural.classify`), the accuracy for each class;
- on the built-in data, the shape probe (`data.shape_probe`: which of disc, square, diamond, ring, cross the large
  shapes are) and the hue on the held-out originals, their reconstructions from each k and the AR samples, side by
  side, and with --grid a PNG of them: a column per class, rows originals / reconstructions from each k / samples;
- with --inception-path also rFID / gFID / IS (`semanticist-fast eval recon` / `eval gen`). FIDs are recorded with
  the weights file's SHA-256; only those of torch-fidelity's weights (SHA-256 beginning 6726825d) mean anything,
  and report.py plots only those.

    python benchmarks/bench_quality.py --tokenizer runs/tokenizer_tiny --ar runs/ar_tiny

Appends a record to the results store (benchmarks/results/history.jsonl) unless --no-write.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_record_arguments, check_clean, describe_device, write_result  # noqa: E402
from semanticist_fast.common.files import sha256_file  # noqa: E402
from semanticist_fast.common.runs import resolve_checkpoint  # noqa: E402
from semanticist_fast.data.procedural import ProceduralImages, classify  # noqa: E402
from semanticist_fast.data.shape_probe import SHAPE_TYPES, shape_accuracy  # noqa: E402
from semanticist_fast.eval.grid import save_grid, token_counts  # noqa: E402
from semanticist_fast.eval.reconstruction import format_report, held_out_set, reconstruction_report  # noqa: E402
from semanticist_fast.inference import Tokenizer, load_generator, sample_images  # noqa: E402

REFERENCE_INCEPTION_SHA256_PREFIX = "6726825d"  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth


def class_accuracy(ar_run: str, per_class: int, batch_size: int, seed: int,
                   device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(figures, samples, their labels): per_class samples of every class, labels 0, 1, ..., C-1, 0, 1, ..."""
    loaded = load_generator(ar_run, str(device))
    tokenizer = Tokenizer.from_checkpoint(loaded.tokenizer_path, device=str(device))
    classes = loaded.gpt.num_classes
    labels = torch.arange(classes * per_class, device=device) % classes
    generator = torch.Generator(device).manual_seed(seed)
    start = time.perf_counter()
    images = torch.cat([sample_images(loaded.gpt, tokenizer, labels[i:i + batch_size], loaded.sample, generator).cpu()
                        for i in range(0, labels.shape[0], batch_size)])
    seconds = time.perf_counter() - start
    predicted = classify(images, classes)
    hits = (predicted == labels.cpu()).float()
    figures = {"samples": int(labels.shape[0]), "accuracy": hits.mean().item(),
               "per_class": [hits[labels.cpu() == c].mean().item() for c in range(classes)],
               "shape_accuracy": shape_accuracy(images, labels.cpu()),
               "sample_seconds": seconds, "samples_per_s": labels.shape[0] / seconds}
    return figures, images, labels.cpu()


def hue_accuracy(images: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    return (classify(images, classes) == labels).float().mean().item()


def one_per_class(labels: torch.Tensor, classes: int, offset: int = 0) -> torch.Tensor:
    """Indices of the (offset+1)-th item of each class, in class order (as many classes as have one)."""
    picks = [(labels == c).nonzero().squeeze(1) for c in range(classes)]
    return torch.stack([p[offset] for p in picks if len(p) > offset])


def fid_figures(args, device: torch.device) -> dict:
    from semanticist_fast.eval.eval_config import EvalConfig
    from semanticist_fast.eval.gen_eval import evaluate_generation
    from semanticist_fast.eval.recon_eval import evaluate_reconstruction

    cfg = EvalConfig(inception_path=args.inception_path, tokens="all", per_class=args.per_class)
    sha = sha256_file(Path(args.inception_path))
    recon = evaluate_reconstruction(args.tokenizer, cfg, device=str(device))
    out = {"inception_sha256": sha, "reference_weights": sha.startswith(REFERENCE_INCEPTION_SHA256_PREFIX),
           "rfid": recon["per_tokens"][-1]["rfid"], "recon_seconds": recon["seconds"]}
    if args.ar:
        gen = evaluate_generation(args.ar, cfg, device=str(device))
        out.update(gfid=gen["gfid"], is_mean=gen["is_mean"], gen_seconds=gen["seconds"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="runs/tokenizer_tiny", help="a trained tokenizer run (or checkpoint)")
    p.add_argument("--ar", default="runs/ar_tiny", help="a trained AR run (or checkpoint); '' to skip")
    p.add_argument("--num-images", type=int, default=256, help="held-out images to reconstruct")
    p.add_argument("--per-class", type=int, default=20, help="AR samples per class")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception-path", default=None, help="also rFID / gFID / IS with these Inception weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", default=None, help="built-in data: write a PNG, a column per class; rows: originals, "
                   "their reconstructions from each k, two rows of samples")
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    device = torch.device(args.device)

    tok = Tokenizer.from_checkpoint(args.tokenizer, device=str(device))
    held_out = held_out_set(args.tokenizer, tok.image_size)
    items = [held_out[i] for i in range(min(args.num_images, len(held_out)))]
    images, labels = torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
    start = time.perf_counter()
    report, reconstructions = reconstruction_report(tok, images, token_counts(tok.num_slots), seed=args.seed,
                                      batch_size=args.batch_size)
    report["seconds"] = time.perf_counter() - start
    print(format_report(report))
    record = {"device": describe_device(device), "device_kind": device.type,
              "tokenizer": str(resolve_checkpoint(args.tokenizer)), "reconstruction": report}
    probe = None
    if isinstance(held_out, ProceduralImages):  # shapes only the built-in data has
        classes = held_out.num_classes
        probe = {"types": list(SHAPE_TYPES), "originals": shape_accuracy(images, labels),
                 "originals_hue": hue_accuracy(images, labels, classes),
                 "reconstructions": [{"tokens": k, "accuracy": shape_accuracy(rec, labels),
                                      "hue": hue_accuracy(rec, labels, classes)}
                                     for k, rec in reconstructions.items()]}
        record["shape_probe"] = probe
    if args.ar:
        record["ar"] = str(resolve_checkpoint(args.ar))
        record["samples"], samples, sample_labels = class_accuracy(args.ar, args.per_class, args.batch_size, args.seed,
                                                                   device)
        print(f"AR samples: {record['samples']['accuracy']:.1%} of {record['samples']['samples']} in their class "
              f"by hue; per class " + " ".join(f"{a:.0%}" for a in record["samples"]["per_class"]))
        if probe is not None:
            probe["samples"], probe["samples_hue"] = record["samples"]["shape_accuracy"], record["samples"]["accuracy"]
            # the issue's bar: samples' shape accuracy over that of the reconstructions from all tokens
            probe["samples_over_reconstructions"] = probe["samples"] / max(probe["reconstructions"][-1]["accuracy"],
                                                                           1e-9)
    if probe is not None:
        print(f"held-out originals, reconstructions and AR samples, by the shape probe ({', '.join(SHAPE_TYPES)}; "
              f"chance 20 %) and by hue:")
        print(f"  {'':>12} {'shape':>7} {'hue':>7}")
        print(f"  {'originals':>12} {probe['originals']:7.1%} {probe['originals_hue']:7.1%}")
        for r in probe["reconstructions"]:
            print(f"  {'k=' + str(r['tokens']):>12} {r['accuracy']:7.1%} {r['hue']:7.1%}")
        if "samples" in probe:
            print(f"  {'samples':>12} {probe['samples']:7.1%} {probe['samples_hue']:7.1%}   "
                  f"(shape x{probe['samples_over_reconstructions']:.2f} of k={probe['reconstructions'][-1]['tokens']})")
    if args.grid and probe is not None:
        pick = one_per_class(labels, classes)
        rows = [images[pick]] + [rec[pick] for rec in reconstructions.values()]
        if args.ar:
            rows += [samples[one_per_class(sample_labels, classes, i)] for i in range(min(2, args.per_class))]
        save_grid(rows, Path(args.grid))
        print("wrote", args.grid)
    if args.inception_path:
        record["fid"] = fid_figures(args, device)
        fid = record["fid"]
        print(f"rFID {fid['rfid']:.3f}" + (f", gFID {fid['gfid']:.3f}, IS {fid['is_mean']:.2f}" if "gfid" in fid else "")
              + ("" if fid["reference_weights"] else " (not torch-fidelity's Inception weights: meaningless)"))
    if not args.no_write:
        print("wrote", write_result("bench_quality", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
