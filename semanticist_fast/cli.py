"""`semanticist-fast` (also `python -m semanticist_fast`): train, reconstruct, convert, sample, export."""
import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("semanticist_fast")


def _parse_tokens(spec: str, num_slots: int) -> list[int]:
    counts = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            counts.append(num_slots)
            continue
        try:
            k = int(part)
        except ValueError:
            raise SystemExit(f"error: --tokens: {part!r} is not a number or 'all' (example: --tokens 1,4,16,all)")
        if not 1 <= k <= num_slots:
            raise SystemExit(f"error: --tokens: {k} is outside 1..{num_slots} (this tokenizer has {num_slots} slots)")
        counts.append(k)
    return counts


def cmd_train(args) -> int:
    from .common.runs import latest_checkpoint, saved_config
    from .config import ConfigError, load_config, migrate_saved, save_config, to_dict
    from .tasks import spec_for_file, train

    out = Path(args.out)
    spec = spec_for_file(args.config)
    run = load_config(spec.run_config, args.config, args.overrides)
    if args.resume and (latest := latest_checkpoint(out)) is not None:
        saved = migrate_saved(spec.run_config, saved_config(latest))
        diffs = _config_differences(saved, to_dict(run), sections=("model", "data", "optim"))
        if diffs:
            raise ConfigError(f"cannot resume {out}: its checkpoint was trained with a different config:\n  "
                              + "\n  ".join(diffs) + "\nuse the same config and overrides, or a new --out directory")
    elif not args.resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue it, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(run, out / "config.yaml")
    metrics = train(run, out, resume=args.resume)
    log.info("done: %s", json.dumps(metrics))
    return 0


def _config_differences(a: dict, b: dict, sections) -> list[str]:
    diffs = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            diffs.append(f"{prefix}: checkpoint {x!r} vs now {y!r}")

    for s in sections:
        walk(a.get(s), b.get(s), s)
    return diffs


def cmd_reconstruct(args) -> int:
    from .data.build import load_images
    from .eval.grid import save_grid, token_counts
    from .eval.reconstruction import format_report, held_out_images, reconstruction_report
    from .inference import Tokenizer

    tok = Tokenizer.from_checkpoint(args.ckpt, device=args.device, codec_path=args.codec_path)
    counts = _parse_tokens(args.tokens, tok.num_slots) if args.tokens else token_counts(tok.num_slots)
    if args.images:
        images = load_images(args.images, tok.image_size)
    else:
        images = held_out_images(args.ckpt, tok.image_size, args.num_images)
    report, reconstructions = reconstruction_report(tok, images, counts, args.guidance, args.steps, args.seed,
                                                    args.batch_size)
    print(format_report(report))
    if args.out:
        save_grid([images[:args.grid_images]] + [r[:args.grid_images] for r in reconstructions.values()], Path(args.out))
        log.info("wrote %s (top row: inputs; then one row per token count %s)", args.out, counts)
    if args.metrics_json:
        from .common.files import atomic_write_text
        atomic_write_text(Path(args.metrics_json), json.dumps(report, indent=2) + "\n")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    path = convert_checkpoint(args.src, args.out, kind=args.kind, overrides=args.overrides)
    log.info("wrote %s", path)
    return 0


def _parse_classes(spec: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes {spec!r}: expected comma-separated class indices, e.g. --classes 1,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes {spec!r}: classes must be in 0..{num_classes - 1} (this model has {num_classes})")
    return classes


SAMPLING_OPTIONS = ("guidance", "guidance_schedule", "temperature", "head_steps", "sampler", "decoder_guidance",
                    "decoder_steps")


def _sampling_overrides(args) -> dict:
    return {name: getattr(args, name) for name in SAMPLING_OPTIONS}


def cmd_sample(args) -> int:
    import torch

    from .eval.grid import save_grid, save_samples

    if (args.ckpt is None) == (args.compiled is None):
        raise ValueError("sample: give an AR checkpoint (CKPT) or an exported directory (--compiled DIR), not both")
    batch_size = args.batch_size
    if args.compiled:
        from .export import CompiledSampler

        if args.tokenizer or args.device:
            raise ValueError("sample --compiled: the export fixed the tokenizer and the device; drop --tokenizer "
                             "and --device (or re-export)")
        sampler = CompiledSampler.load(args.compiled)
        device, num_classes = sampler.device, sampler.manifest["ar"]["num_classes"]
        settings = sampler.resolved(**_sampling_overrides(args))  # bad settings fail before any sampling
        batch_size = min(batch_size, sampler.manifest["batch"]["max"])

        def draw(labels, generator):
            return sampler.sample_images(labels, generator, **settings)
    else:
        from .inference import Tokenizer, load_generator, sample_images
        from .inference.generation import with_overrides

        loaded = load_generator(args.ckpt, args.device)
        device, num_classes = next(loaded.gpt.parameters()).device, loaded.gpt.num_classes
        tokenizer_path = args.tokenizer or loaded.tokenizer_path
        if not tokenizer_path:
            raise ValueError(f"{args.ckpt} names no tokenizer (a converted checkpoint): pass --tokenizer PATH")
        tokenizer = Tokenizer.from_checkpoint(tokenizer_path, device=str(device))
        # Every option left unset falls back to the run's `sample` section.
        s = with_overrides(loaded.sample, **_sampling_overrides(args))

        def draw(labels, generator):
            return sample_images(loaded.gpt, tokenizer, labels, s, generator)
    classes = _parse_classes(args.classes, num_classes)
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)], device=device)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = torch.cat([draw(labels[start:start + batch_size], generator).cpu()
                        for start in range(0, labels.shape[0], batch_size)])
    out = Path(args.out)
    save_grid(list(images.view(len(classes), args.per_class, *images.shape[1:])), out)
    save_samples(images, labels, out.with_suffix(".npz"))
    log.info("wrote %s (one row per class %s) and %s", out, classes, out.with_suffix(".npz"))
    return 0


def cmd_export(args) -> int:
    from .export.build import export_sampler

    path = export_sampler(args.ckpt, args.out, tokenizer=args.tokenizer, max_batch=args.batch,
                          static_batch=args.static_batch, device=args.device, compile=not args.no_compile,
                          **_sampling_overrides(args))
    log.info("wrote %s and its packages; sample with: semanticist-fast sample --compiled %s", path, args.out)
    return 0


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The sampling settings of `sample` and `export`; unset ones take the checkpoint's `sample` section."""
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None, help="class guidance scale")
    p.add_argument("--guidance-schedule", "--cfg-schedule", dest="guidance_schedule", choices=["linear", "constant"],
                   default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--head-steps", type=int, default=None, help="diffusion-head network calls per token")
    p.add_argument("--sampler", choices=["sde", "ode", "heun", "adams", "dpm"], default=None,
                   help="diffusion-head sampler: sde / ode (Euler; DDIM for a ddpm head), heun or adams "
                        "(second order, flow heads), dpm (DPM-Solver++(2M), ddpm heads)")
    p.add_argument("--decoder-guidance", "--decoder-cfg", dest="decoder_guidance", type=float, default=None,
                   help="tokenizer decoder guidance scale")
    p.add_argument("--decoder-steps", default=None,
                   help="tokenizer decoder steps, e.g. 250, ddim25 or dpm20 (ddpm), euler4, adams4 or heun4 (flow)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer checkpoint (default: the one the AR model was trained on)")
    p.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semanticist-fast", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a tokenizer or AR model from a YAML config")
    t.add_argument("config")
    t.add_argument("--out", default="runs/latest", help="run directory: config.yaml, checkpoints/, metrics, previews")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=64")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("reconstruct", help="reconstruct images from their first k tokens; MSE / PSNR / SSIM per k "
                                           "against the flat mean-colour baseline")
    r.add_argument("ckpt", help="checkpoint file or run directory")
    r.add_argument("images", nargs="*",
                   help="image files (default: the run's held-out images: the built-in val split or data.val_root)")
    r.add_argument("--tokens", default=None, help="token counts, e.g. 1,4,16,all (default: 1, 2, 4, ... all)")
    r.add_argument("--out", default=None, help="PNG grid path")
    r.add_argument("--metrics-json", default=None)
    r.add_argument("--num-images", type=int, default=64)
    r.add_argument("--grid-images", type=int, default=8)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                   help="decoder classifier-free guidance (default: the config's model.diffusion.guidance)")
    r.add_argument("--steps", default=None,
                   help="decoder steps: 250 or ddim25 (ddpm), euler4 (flow) (default: the config's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default=None)
    r.add_argument("--codec-path", default=None, help="KL-16 VAE directory, if it moved since training")
    r.set_defaults(fn=cmd_reconstruct)

    c = sub.add_parser("convert", help="convert an official Semanticist checkpoint to ours")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--kind", choices=["auto", "tokenizer", "gpt"], default="auto")
    c.add_argument("overrides", nargs="*", help="config overrides for the converted model, e.g. model.codec.path=...")
    c.set_defaults(fn=cmd_convert)

    s = sub.add_parser("sample", help="class-conditional samples from an AR checkpoint or an exported directory")
    s.add_argument("ckpt", nargs="?", default=None, help="AR checkpoint file or run directory")
    s.add_argument("--compiled", default=None, metavar="DIR",
                   help="sample with the AOTInductor packages of `semanticist-fast export` instead of a checkpoint")
    s.add_argument("--classes", default="0,1")
    s.add_argument("--per-class", type=int, default=4)
    _add_sampling_options(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64, help="images per batch (--compiled: at most the export's)")
    s.add_argument("--out", default="samples.png")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("export", help="AOTInductor packages of the sampler's steps, for `sample --compiled`")
    e.add_argument("ckpt", help="AR checkpoint file or run directory")
    e.add_argument("--out", required=True, help="directory for the packages and manifest.json")
    e.add_argument("--batch", type=int, default=8, help="the largest batch the packages take (default 8)")
    e.add_argument("--static-batch", action="store_true",
                   help="compile for exactly --batch images, not a dynamic batch of 1..--batch")
    e.add_argument("--no-compile", action="store_true",
                   help="write the traced programs uncompiled (torch.export.save): no C++ compiler needed, eager speed")
    _add_sampling_options(e)
    e.set_defaults(fn=cmd_export)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # Overrides may follow options (`train CFG --out DIR a.b=1`), which plain argparse would refuse.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from .config import ConfigError
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError; named for the reader
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the newest checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
