"""AR sampling against the reference design's sampler, on the same model, labels and seeds, variants in turns.

    python benchmarks/bench_sample.py --ckpt runs/ar_tiny            # a trained AR checkpoint
    python benchmarks/bench_sample.py --size L --batch 64 --device cuda  # random GPT-L weights, AR-L shapes

The baseline ("reference") is the published sampler's algorithm (../shared/reference/SEMANTICIST.md, Sampling):
static KV cache, the class token prefilled, one token per step, CFG by a doubled batch, and the diffusion head
called as the reference calls it: two network calls per SDE step (drift and score), the condition and timestep
embedded again for every row at every call (sampler="sde_naive"). "ours" differs only in the head: one call per
step, the condition embedded once per token. --no-cache adds a third, labelled extra: the same two-call head
without a KV cache (the whole prefix re-run every token), which is not what the reference does and is not the
baseline of any quoted ratio.

Reports images/s of the token generation (the tokenizer decode is identical for all and is left out), the median
per-round ratio with its spread, and the largest difference between the samplers' tokens (same noise: ~0).

    python benchmarks/bench_sample.py --compiled runs/ar_tiny_export [--ckpt runs/ar_tiny]

The exported sampler (`semanticist-fast export`; done first, from --ckpt with --batch, when DIR holds no export)
against the reference algorithm above run eagerly, and against our eager sampler, with the export's settings:
images/s end to end (tokens, then the tokenizer decode, the same eager decode for both eager variants) and of the
tokens alone, the ratios, and the largest difference between the images (same noise).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (add_record_arguments, check_clean, describe_device, format_ratio,  # noqa: E402
                               interleaved, ratio_stats, variant_summary, write_result)
from semanticist_fast.models.gpt import GPT, GPTConfig  # noqa: E402
from semanticist_fast.inference.generation import generate  # noqa: E402

REFERENCE = "static KV cache, CFG by a doubled batch, head called twice per SDE step (the reference's sampler)"
OURS = "static KV cache, CFG by a doubled batch, head called once per SDE step"
NO_CACHE = "extra, not a baseline: no KV cache (whole prefix re-run every token), head called twice per step"


def load_model(args, device) -> GPT:
    if args.ckpt:
        from semanticist_fast.inference import load_generator
        return load_generator(args.ckpt, str(device)).gpt
    cfg = GPTConfig(size=args.size) if args.size != "tiny" else GPTConfig(
        size="custom", layers=4, heads=4, dim=128, head_width=128, head_depth=3, num_classes=10)
    torch.manual_seed(0)
    return GPT(cfg).to(device).eval()


def compare_compiled(args) -> dict:
    """The reference algorithm (eager), our eager sample_images and the CompiledSampler, same labels and seeds."""
    from semanticist_fast.config import from_dict
    from semanticist_fast.export import CompiledSampler
    from semanticist_fast.inference import SampleConfig, Tokenizer, load_generator

    directory = Path(args.compiled)
    if not (directory / "manifest.json").is_file():
        if not args.ckpt:
            raise SystemExit(f"{directory} holds no export: pass --ckpt to export one there first")
        from semanticist_fast.export.package import export_sampler
        export_sampler(args.ckpt, directory, max_batch=args.batch, device=args.device)
    compiled = CompiledSampler.load(directory)
    checkpoints = compiled.manifest["checkpoints"]
    device = compiled.device
    gpt = load_generator(checkpoints["autoregressive"]["path"], str(device)).gpt
    tokenizer = Tokenizer.from_checkpoint(checkpoints["tokenizer"]["path"], device=str(device))
    s = from_dict(SampleConfig, compiled.resolved())
    # The reference calls its head twice per step only in the SDE; any other sampler is the same in both.
    reference_sampler = "sde_naive" if s.sampler == "sde" else s.sampler
    labels = torch.arange(args.batch, device=device) % gpt.num_classes

    def seeded():
        return torch.Generator(device).manual_seed(0)

    def tokens(sampler, generator):
        return generate(gpt, labels, s.guidance, s.guidance_schedule, s.temperature, generator, s.head_steps, sampler)

    def images(sampler):
        generator = seeded()  # the decoder draws its noise after the tokens', as sample_images does
        return tokenizer.decode(tokens(sampler, generator), num_tokens=gpt.num_tokens, guidance=s.decoder_guidance,
                                steps=s.decoder_steps, generator=generator)

    end_to_end = {"reference": lambda: images(reference_sampler), "eager": lambda: images(s.sampler),
                  "compiled": lambda: compiled.sample_images(labels, seeded())}
    tokens_alone = {"reference": lambda: tokens(reference_sampler, seeded()),
                    "eager": lambda: tokens(s.sampler, seeded()),
                    "compiled": lambda: compiled.generate(labels, seeded())}
    record = {
        "device": describe_device(device), "device_kind": device.type, "mode": "compiled",
        "export": str(directory), "checkpoints": checkpoints, "batch": args.batch, "sample": compiled.resolved(),
        "num_tokens": gpt.num_tokens, "rounds": args.repeats,
        "variants": {"reference": REFERENCE + ", eager, then our eager decode", "eager": OURS + ", eager",
                     "compiled": "the AOTInductor export (semanticist-fast export)"},
    }
    for part, runs in (("end_to_end", end_to_end), ("tokens", tokens_alone)):
        times = interleaved(runs, device, rounds=args.repeats, warmup=1)
        record[part] = {name: variant_summary(t, args.batch) for name, t in times.items()}
        record[part]["compiled_vs_reference"] = ratio_stats(times["reference"], times["compiled"])
        record[part]["compiled_vs_eager"] = ratio_stats(times["eager"], times["compiled"])
        record[part]["eager_vs_reference"] = ratio_stats(times["reference"], times["eager"])
    reference_images = end_to_end["reference"]()
    record["max_abs_image_diff"] = (end_to_end["compiled"]() - reference_images).abs().max().item()
    record["max_abs_image_diff_eager"] = (end_to_end["eager"]() - reference_images).abs().max().item()
    e = record["end_to_end"]
    return finish(record, f"{record['device']}, batch {args.batch}: end to end reference "
                          f"{e['reference']['images_per_s']:.2f} img/s, eager {e['eager']['images_per_s']:.2f}, "
                          f"compiled {e['compiled']['images_per_s']:.2f}; compiled vs reference "
                          f"{format_ratio(e['compiled_vs_reference'])}, vs eager "
                          f"{format_ratio(e['compiled_vs_eager'])}; tokens alone compiled vs reference "
                          f"{format_ratio(record['tokens']['compiled_vs_reference'])}; max |image diff| "
                          f"{record['max_abs_image_diff']:.2e}", args)


def finish(record: dict, summary: str, args) -> dict:
    print(summary)
    if not args.no_write:
        print("wrote", write_result("bench_sample", record, allow_dirty=args.allow_dirty))
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--compiled", default=None, metavar="DIR", help="the export in DIR against eager (see above)")
    p.add_argument("--size", default="tiny", choices=["tiny", "B", "L", "XL", "XXL"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--head-steps", type=int, default=50)
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, every variant once a round")
    p.add_argument("--no-cache", action="store_true", help="also time the labelled extra without a KV cache")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is steadier on a machine shared with other work")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compiled:
        return compare_compiled(args)
    device = torch.device(args.device)
    gpt = load_model(args, device)
    labels = torch.arange(args.batch, device=device) % gpt.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def run(sampler: str, use_kv_cache: bool = True):
        generator = torch.Generator(device).manual_seed(0)
        with autocast:
            return generate(gpt, labels, args.guidance, "linear", 1.0, generator, args.head_steps,
                            sampler=sampler, use_kv_cache=use_kv_cache)

    runs = {"reference": lambda: run("sde_naive"), "ours": lambda: run("sde")}
    if args.no_cache:
        runs["no_cache"] = lambda: run("sde_naive", use_kv_cache=False)
    times = interleaved(runs, device, rounds=args.repeats, warmup=1)
    record = {
        "device": describe_device(device), "device_kind": device.type,
        "model": args.ckpt or f"random GPT-{args.size}", "batch": args.batch, "head_steps": args.head_steps,
        "guidance": args.guidance, "num_tokens": gpt.num_tokens, "bf16": args.bf16, "rounds": args.repeats,
        "variants": {"reference": REFERENCE, "ours": OURS, **({"no_cache": NO_CACHE} if args.no_cache else {})},
        **{name: variant_summary(t, args.batch) for name, t in times.items()},
        "ours_vs_reference": ratio_stats(times["reference"], times["ours"]),
        "max_abs_token_diff": (run("sde") - run("sde_naive")).abs().max().item(),
    }
    if args.no_cache:
        record["reference_vs_no_cache"] = ratio_stats(times["no_cache"], times["reference"])
    summary = (f"{record['device']}: reference {record['reference']['images_per_s']:.2f} img/s, ours "
               f"{record['ours']['images_per_s']:.2f} img/s, {format_ratio(record['ours_vs_reference'])}, "
               f"max |token diff| {record['max_abs_token_diff']:.2e}")
    if args.no_cache:
        summary += (f"; extra: no KV cache {record['no_cache']['images_per_s']:.2f} img/s (the reference "
                    f"{format_ratio(record['reference_vs_no_cache'])} faster)")
    return finish(record, summary, args)


if __name__ == "__main__":
    main()
