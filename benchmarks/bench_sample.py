"""AR sampling: the naive sampler (no KV cache, two head calls per SDE step, as the reference) against ours
(static KV cache, one head call per step), on the same model, labels and seeds, in one run.

    python benchmarks/bench_sample.py --ckpt runs/ar_tiny            # a trained AR checkpoint
    python benchmarks/bench_sample.py --size L --batch 64 --device cuda  # random GPT-L weights, AR-L shapes

Reports tokens->images/s of the token generation (the tokenizer decode is identical for both and is left out),
their ratio, and the largest difference between the two samplers' tokens (same noise, so it should be ~0).

    python benchmarks/bench_sample.py --compiled runs/ar_tiny_export [--ckpt runs/ar_tiny]

Eager against exported (`semanticist-fast export`; done first, from --ckpt with --batch, when DIR holds no
export): images/s end to end (tokens, then the tokenizer decode) and of the tokens alone, the ratios, and the
largest difference between their images (same noise). Both sample with the export's settings.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import describe_device, time_call, write_result  # noqa: E402
from semanticist_fast.models.gpt import GPT, GPTConfig  # noqa: E402
from semanticist_fast.inference.generation import generate  # noqa: E402


def load_model(args, device) -> GPT:
    if args.ckpt:
        from semanticist_fast.inference import load_generator
        return load_generator(args.ckpt, str(device)).gpt
    cfg = GPTConfig(size=args.size) if args.size != "tiny" else GPTConfig(
        size="custom", layers=4, heads=4, dim=128, head_width=128, head_depth=3, num_classes=10)
    torch.manual_seed(0)
    return GPT(cfg).to(device).eval()


def compare_compiled(args) -> dict:
    """Eager sample_images against CompiledSampler, on the same labels and seeds, in one run."""
    from semanticist_fast.config import from_dict
    from semanticist_fast.export import CompiledSampler
    from semanticist_fast.inference import SampleConfig, Tokenizer, load_generator, sample_images

    directory = Path(args.compiled)
    if not (directory / "manifest.json").is_file():
        if not args.ckpt:
            raise SystemExit(f"{directory} holds no export: pass --ckpt to export one there first")
        from semanticist_fast.export.build import export_sampler
        export_sampler(args.ckpt, directory, max_batch=args.batch, device=args.device)
    compiled = CompiledSampler.load(directory)
    checkpoints = compiled.manifest["checkpoints"]
    device = compiled.device
    gpt = load_generator(checkpoints["autoregressive"]["path"], str(device)).gpt
    tokenizer = Tokenizer.from_checkpoint(checkpoints["tokenizer"]["path"], device=str(device))
    s = from_dict(SampleConfig, compiled.resolved())
    labels = torch.arange(args.batch, device=device) % gpt.num_classes

    def seeded():
        return torch.Generator(device).manual_seed(0)

    runs = {
        "eager": lambda: sample_images(gpt, tokenizer, labels, s, seeded()),
        "compiled": lambda: compiled.sample_images(labels, seeded()),
        "eager_tokens": lambda: generate(gpt, labels, s.guidance, s.guidance_schedule, s.temperature, seeded(),
                                         s.head_steps, s.sampler),
        "compiled_tokens": lambda: compiled.generate(labels, seeded()),
    }
    for fn in runs.values():
        fn()  # warm-up: first calls build sampler tables, caches and the packages' lazy state
    # Interleaved repeats, so a burst of load from elsewhere on a shared machine hits every side alike.
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name] += time_call(fn, device, repeats=1, warmup=0)
    results = {name: {"seconds": min(t), "images_per_s": args.batch / min(t), "all_seconds": t}
               for name, t in times.items()}
    diff = (runs["compiled"]() - runs["eager"]()).abs().max().item()
    record = {
        "device": describe_device(device), "device_kind": device.type, "mode": "compiled",
        "export": str(directory), "checkpoints": checkpoints, "batch": args.batch, "sample": compiled.resolved(),
        "num_tokens": gpt.num_tokens, **results,
        "speedup_end_to_end": results["eager"]["seconds"] / results["compiled"]["seconds"],
        "speedup_tokens": results["eager_tokens"]["seconds"] / results["compiled_tokens"]["seconds"],
        "max_abs_image_diff": diff,
    }
    return finish(record, f"{record['device']}: end to end eager {results['eager']['images_per_s']:.2f} img/s, "
                          f"compiled {results['compiled']['images_per_s']:.2f} img/s, "
                          f"x{record['speedup_end_to_end']:.2f}; tokens alone x{record['speedup_tokens']:.2f}; "
                          f"max |image diff| {diff:.2e}", args.no_write)


def finish(record: dict, summary: str, no_write: bool) -> dict:
    print(summary)
    if not no_write:
        print("wrote", write_result("bench_sample", record))
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--compiled", default=None, metavar="DIR", help="eager against the export in DIR (see above)")
    p.add_argument("--size", default="tiny", choices=["tiny", "B", "L", "XL", "XXL"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--head-steps", type=int, default=50)
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is steadier on a machine shared with other work")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compiled:
        return compare_compiled(args)
    device = torch.device(args.device)
    gpt = load_model(args, device)
    labels = torch.arange(args.batch, device=device) % gpt.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def run(fast: bool):
        generator = torch.Generator(device).manual_seed(0)
        with autocast:
            return generate(gpt, labels, args.guidance, "linear", 1.0, generator, args.head_steps,
                            sampler="sde" if fast else "sde_naive", use_kv_cache=fast)

    results = {}
    for name, fast in (("naive", False), ("ours", True)):
        times = time_call(lambda: run(fast), device, repeats=args.repeats)
        best = min(times)
        results[name] = {"seconds": best, "images_per_s": args.batch / best, "all_seconds": times}
    diff = (run(True) - run(False)).abs().max().item()
    record = {
        "device": describe_device(device), "device_kind": device.type,
        "model": args.ckpt or f"random GPT-{args.size}", "batch": args.batch, "head_steps": args.head_steps,
        "guidance": args.guidance, "num_tokens": gpt.num_tokens, "bf16": args.bf16,
        "naive": results["naive"], "ours": results["ours"],
        "speedup": results["naive"]["seconds"] / results["ours"]["seconds"],
        "max_abs_token_diff": diff,
    }
    return finish(record, f"{record['device']}: naive {results['naive']['images_per_s']:.2f} img/s, "
                          f"ours {results['ours']['images_per_s']:.2f} img/s, speedup x{record['speedup']:.2f}, "
                          f"max |token diff| {diff:.2e}", args.no_write)


if __name__ == "__main__":
    main()
