"""`semanticist-fast` (also `python -m semanticist_fast`): train, reconstruct, convert, sample."""
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
    from .config import ConfigError, load_config, save_config, to_dict
    from .engine.checkpoint import latest_checkpoint, load_checkpoint

    out = Path(args.out)
    kind, run_cls, train_fn = _train_target(args.config)
    run = load_config(run_cls, args.config, args.overrides)
    if args.resume and (latest := latest_checkpoint(out)) is not None:
        saved = load_checkpoint(latest, mmap=True)["config"]
        diffs = _config_differences(saved, to_dict(run), sections=("model", "data", "optim"))
        if diffs:
            raise ConfigError(f"cannot resume {out}: its checkpoint was trained with a different config:\n  "
                              + "\n  ".join(diffs) + "\nuse the same config and overrides, or a new --out directory")
    elif not args.resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue it, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(run, out / "config.yaml")
    metrics = train_fn(run, out, resume=args.resume)
    log.info("done: %s", json.dumps(metrics))
    return 0


def _train_target(config_path: str):
    """The YAML's `kind` picks the stage; a tokenizer config is the default."""
    import yaml

    try:
        with open(config_path) as f:
            kind = (yaml.safe_load(f) or {}).get("kind", "tokenizer")
    except FileNotFoundError:
        raise SystemExit(f"error: config file {config_path} does not exist")
    if kind == "tokenizer":
        from .train_tokenizer import TokenizerRun, train_tokenizer
        return kind, TokenizerRun, train_tokenizer
    if kind == "autoregressive":
        from .train_ar import ARRun, train_ar
        return kind, ARRun, train_ar
    raise SystemExit(f"error: {config_path}: kind {kind!r} is not known; use 'tokenizer' or 'autoregressive'")


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
    import torch

    from .data.build import build_dataset, load_images
    from .eval.grid import save_grid, token_counts
    from .eval.metrics import mse, psnr
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(args.ckpt, device=args.device, codec_path=args.codec_path)
    num_slots = tok.model.num_slots
    counts = _parse_tokens(args.tokens, num_slots) if args.tokens else token_counts(num_slots)
    if args.images:
        images = load_images(args.images, tok.cfg.image_size)
    else:
        from .config import from_dict
        from .data.build import DataConfig
        from .engine.checkpoint import load_checkpoint

        config = load_checkpoint(args.ckpt, mmap=True)["config"]
        data_cfg = from_dict(DataConfig, config["data"], prefix="data.")
        if data_cfg.dataset != "procedural":
            raise SystemExit("error: this checkpoint was not trained on the built-in data: pass image files to reconstruct")
        val = build_dataset(data_cfg, tok.cfg.image_size, "val", seed=config["train"]["seed"])  # the previews' images
        images = torch.stack([val[i][0] for i in range(min(args.num_images, len(val)))])
    batches = list(images.split(args.batch_size))
    tokens = [tok.encode(batch) for batch in batches]
    results, rows = [], [images]
    for k in counts:
        recs = []
        for i, batch_tokens in enumerate(tokens):
            generator = torch.Generator(tok.device).manual_seed(args.seed + i * args.batch_size)
            recs.append(tok.decode(batch_tokens, num_tokens=k, cfg=args.cfg, steps=args.steps, generator=generator).cpu())
        rec = torch.cat(recs)
        rows.append(rec)
        results.append({"tokens": k, "mse": mse(rec, images).mean().item(), "psnr": psnr(rec, images).mean().item()})
        log.info("k=%d  mse=%.5f  psnr=%.2f dB", k, results[-1]["mse"], results[-1]["psnr"])
    if args.out:
        save_grid([r[:args.grid_images] for r in rows], Path(args.out))
        log.info("wrote %s (top row: inputs; then one row per token count %s)", args.out, counts)
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    path = convert_checkpoint(args.src, args.out, kind=args.kind, overrides=args.overrides)
    log.info("wrote %s", path)
    return 0


def cmd_sample(args) -> int:
    from .sample_cli import run_sample
    return run_sample(args)


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

    r = sub.add_parser("reconstruct", help="reconstruct images from their first k tokens and report MSE / PSNR")
    r.add_argument("ckpt", help="checkpoint file or run directory")
    r.add_argument("images", nargs="*", help="image files (default: held-out built-in images)")
    r.add_argument("--tokens", default=None, help="token counts, e.g. 1,4,16,all (default: 1, 2, 4, ... all)")
    r.add_argument("--out", default=None, help="PNG grid path")
    r.add_argument("--metrics-json", default=None)
    r.add_argument("--num-images", type=int, default=64)
    r.add_argument("--grid-images", type=int, default=8)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--cfg", type=float, default=None, help="decoder guidance (default: the config's)")
    r.add_argument("--steps", default=None, help="sampling steps, e.g. 250 or ddim25 (default: the config's)")
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

    s = sub.add_parser("sample", help="class-conditional samples from an AR checkpoint")
    s.add_argument("ckpt")
    s.add_argument("--classes", default="0,1")
    s.add_argument("--per-class", type=int, default=4)
    # Unset sampling options take the values of the checkpoint's `sample` section.
    s.add_argument("--cfg", type=float, default=None, help="class guidance scale")
    s.add_argument("--cfg-schedule", choices=["linear", "constant"], default=None)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--head-steps", type=int, default=None, help="diffusion-head sampling steps per token")
    s.add_argument("--sampler", choices=["sde", "ode"], default=None)
    s.add_argument("--decoder-cfg", type=float, default=None, help="tokenizer decoder guidance scale")
    s.add_argument("--decoder-steps", default=None, help="tokenizer decoder steps, e.g. 250 or ddim25")
    s.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one the AR model was trained on)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_sample)
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
