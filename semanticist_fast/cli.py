"""`semanticist-fast` (also `python -m semanticist_fast`): train, plan, cache, reconstruct, sample, convert, eval,
export, demo.

Exit codes: 0 done; 1 a runtime error (a file that cannot be used, a non-finite run, a rank that died, a full
disk); 2 a usage error (a bad option, config key or value); 75 stopped by a signal after writing a checkpoint
(continue with --resume); 130 interrupted. Errors are one line naming the key or file; --debug adds the traceback.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("semanticist_fast")
_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every subcommand's help shows its defaults


class UsageError(ValueError):
    """A bad option value: exit 2, like argparse's own errors."""


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value
    return parse


def cmd_train(args) -> int:
    from .common.distributed import close
    from .config import load_config
    from .tasks import load_deepspeed_config, spec_for_file, train

    spec = spec_for_file(args.config)
    run = load_config(spec.run_config, args.config, args.overrides)
    try:
        metrics = train(run, Path(args.out), resume=args.resume,
                        deepspeed_config=load_deepspeed_config(args.deepspeed_config))
    finally:
        close()
    log.info("done: %s", json.dumps(metrics))
    return 0


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a tokenizer or AR model from a YAML config", formatter_class=_FORMAT)
    t.add_argument("config", help="YAML config (its kind: tokenizer or autoregressive)")
    t.add_argument("--out", default="runs/latest", help="run directory: config.yaml, checkpoints/, metrics, previews")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out that verifies")
    t.add_argument("--deepspeed-config", default=None,
                   help="JSON of further DeepSpeed settings (train.engine=deepspeed); a key the YAML sets too is an "
                        "error")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=64")
    # Launchers that pass the local rank as an argument (the env var LOCAL_RANK is what counts).
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(fn=cmd_train)


def cmd_plan(args) -> int:
    from .config import load_config
    from .plan.planner import format_plan, make_plan
    from .tasks import spec_for_file

    run = load_config(spec_for_file(args.config).run_config, args.config, args.overrides)
    plan = make_plan(run, args.gpus, args.nodes, args.gpu, args.images, args.mfu, args.views)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def add_plan_parser(sub) -> None:
    from .plan.hardware import GPUS

    pl = sub.add_parser("plan", help="what `train CONFIG` would cost: parameters, FLOPs, memory per GPU, time, "
                                     "disk (no weights or data read)", formatter_class=_FORMAT)
    pl.add_argument("config", help="YAML config, as for train")
    pl.add_argument("--gpus", type=_positive("--gpus"), default=1, help="GPUs in all")
    pl.add_argument("--nodes", type=_positive("--nodes"), default=1, help="nodes they span")
    pl.add_argument("--gpu", default="h100", choices=list(GPUS), help="the GPU: its memory, peak FLOP/s and links")
    pl.add_argument("--images", type=_positive("--images"), default=None,
                    help="training images (default: data.num_items, or ImageNet's 1,281,167 for an imagenet root)")
    pl.add_argument("--mfu", type=float, default=None,
                    help="model FLOPs utilisation (default: the results store's for this model and GPU, else 0.4)")
    pl.add_argument("--views", choices=["ten_crop", "center_flip", "center"], default=None,
                    help="views per image of the cache (default: cache.views; the latent cache: ten_crop)")
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    pl.set_defaults(fn=cmd_plan)


def cmd_cache(args) -> int:
    from .common.distributed import close
    from .config import load_config
    from .tasks import spec_for_file
    from .tasks.tokenizer_stage import build_latent_cache_for_run

    spec = spec_for_file(args.config)
    if spec.kind != "tokenizer":
        raise UsageError(f"{args.config} is a {spec.kind} config: `cache` builds stage 1's latent cache from a "
                         "tokenizer config (the AR stage builds its token cache itself)")
    run = load_config(spec.run_config, args.config, args.overrides)
    try:
        out, complete = build_latent_cache_for_run(run, Path(args.out), args.views, args.shard_size,
                                                   args.batch_size, progress=run.train.progress)
    finally:
        close()
    if complete:
        log.info("latent cache complete in %s; train with data.latents=%s", out, out)
    else:
        log.info("this rank's shards of %s are built; the cache is complete once every rank has finished", out)
    return 0


def add_cache_parser(sub) -> None:
    k = sub.add_parser("cache", help="encode a tokenizer config's training images once: the VAE posterior of every "
                                     "view, for data.latents=DIR", formatter_class=_FORMAT)
    k.add_argument("config", help="tokenizer YAML (model.codec: the KL-16 VAE; data: the images)")
    k.add_argument("--out", required=True, help="cache directory (a partial build resumes)")
    k.add_argument("--views", choices=["ten_crop", "center_flip", "center"], default="ten_crop",
                   help="views per image: ten-crop (20), the centre crop and its mirror, or the centre crop")
    k.add_argument("--shard-size", type=_positive("--shard-size"), default=256, help="images per shard")
    k.add_argument("--batch-size", type=_positive("--batch-size"), default=64, help="views per encoder call")
    k.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=/data/train")
    k.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    k.set_defaults(fn=cmd_cache)


def cmd_reconstruct(args) -> int:
    from .data.datasets import load_images
    from .eval.grid import save_grid, token_counts
    from .eval.reconstruction import format_report, held_out_images, parse_token_counts, reconstruction_report
    from .inference import Tokenizer

    tok = Tokenizer.from_checkpoint(args.ckpt, device=args.device, codec_path=args.codec_path,
                                    precision=_precision(args))
    counts = parse_token_counts(args.tokens, tok.num_slots) if args.tokens else token_counts(tok.num_slots)
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


def add_reconstruct_parser(sub) -> None:
    r = sub.add_parser("reconstruct", help="reconstruct images from their first k tokens; MSE / PSNR / SSIM per k "
                                           "against the flat mean-colour baseline", formatter_class=_FORMAT)
    r.add_argument("ckpt", help="checkpoint (folder or file) or run directory (its newest checkpoint that verifies)")
    r.add_argument("images", nargs="*",
                   help="image files (default: the run's held-out images: the built-in val split or data.val_root)")
    r.add_argument("--tokens", default=None, help="token counts, e.g. 1,4,16,all (default: 1, 2, 4, ... all)")
    r.add_argument("--out", default=None, help="PNG grid path (none: no grid)")
    r.add_argument("--metrics-json", default=None, help="write the report as JSON here")
    r.add_argument("--num-images", type=_positive("--num-images"), default=64, help="held-out images to score")
    r.add_argument("--grid-images", type=_positive("--grid-images"), default=8, help="images per row of the grid")
    r.add_argument("--batch-size", type=_positive("--batch-size"), default=32,
                   help="images decoded at once, each batch with its own seeded noise as each shard of `eval recon`: "
                        "the same figures as eval recon with --shard-size equal to this, the same images and seed")
    r.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                   help="decoder classifier-free guidance (default: the config's model.diffusion.guidance)")
    r.add_argument("--steps", default=None,
                   help="decoder steps: 250 or ddim25 (ddpm), euler4 (flow) (default: the config's)")
    r.add_argument("--seed", type=int, default=0, help="seed of the decoding noise")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    _add_precision_arg(r)
    r.add_argument("--codec-path", default=None, help="KL-16 VAE directory, if it moved since training")
    r.set_defaults(fn=cmd_reconstruct)


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    path = convert_checkpoint(args.src, args.out, kind=args.kind, overrides=args.overrides)
    log.info("wrote %s", path)
    return 0


def add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert an official Semanticist checkpoint to ours (a .safetensors file)",
                       formatter_class=_FORMAT)
    c.add_argument("src", help="official checkpoint (.pt / .pth / .safetensors)")
    c.add_argument("out", help="where to write ours (.safetensors)")
    c.add_argument("--kind", choices=["auto", "tokenizer", "gpt"], default="auto", help="what src holds")
    c.add_argument("overrides", nargs="*", help="config overrides for the converted model, e.g. model.codec.path=...")
    c.set_defaults(fn=cmd_convert)


def _parse_classes(spec: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes {spec!r}: expected comma-separated class indices, e.g. --classes 1,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise UsageError(f"--classes {spec!r}: classes must be in 0..{num_classes - 1} (this model has {num_classes})")
    return classes


def cmd_sample(args) -> int:
    import torch

    from .eval.grid import save_grid, save_samples
    from .export.choice import make_sampler

    if (args.ckpt is None) == (args.compiled is None):
        raise UsageError("sample: give an AR checkpoint (CKPT) or an exported directory (--compiled DIR), not both")
    if args.compiled and (args.tokenizer or args.device or args.precision):
        raise UsageError("sample --compiled: the export fixed the tokenizer, the device and the precision; drop "
                         "--tokenizer, --device and --precision (or re-export)")
    sampler = make_sampler(args.ckpt, args.compiled, args.tokenizer, args.device, _precision(args))
    # Every option left unset falls back to the run's (or the export's) `sample` settings; bad ones fail now.
    try:
        settings = sampler.resolved(**_sampling_overrides(args))
    except ValueError as e:
        raise UsageError(str(e)) from None
    batch_size = min(args.batch_size, sampler.max_batch or args.batch_size)
    classes = _parse_classes(args.classes, sampler.num_classes)
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)], device=sampler.device)
    generator = torch.Generator(sampler.device).manual_seed(args.seed)
    images = torch.cat([sampler.sample_images(labels[start:start + batch_size], generator, **settings).cpu()
                        for start in range(0, labels.shape[0], batch_size)])
    out = Path(args.out)
    save_grid(list(images.view(len(classes), args.per_class, *images.shape[1:])), out)
    save_samples(images, labels, out.with_suffix(".npz"))
    log.info("wrote %s (one row per class %s) and %s", out, classes, out.with_suffix(".npz"))
    return 0


def add_sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="class-conditional samples from an AR checkpoint or an exported directory",
                       formatter_class=_FORMAT)
    s.add_argument("ckpt", nargs="?", default=None, help="AR checkpoint (folder or file) or run directory")
    s.add_argument("--compiled", default=None, metavar="DIR",
                   help="sample with the AOTInductor packages of `semanticist-fast export` instead of a checkpoint")
    s.add_argument("--classes", default="0,1", help="comma-separated class indices, one grid row each")
    s.add_argument("--per-class", type=_positive("--per-class"), default=4, help="samples per class")
    _add_sampling_args(s)
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--batch-size", type=_positive("--batch-size"), default=64,
                   help="samples drawn at once (--compiled: at most the export's)")
    s.add_argument("--out", default="samples.png", help="PNG grid; the images and labels also go to OUT.npz")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    _add_precision_arg(s)
    s.set_defaults(fn=cmd_sample)


def _sampling_overrides(args) -> dict:
    """The sampling options given; each one left unset (None) falls back to the run's `sample` section."""
    from .common.sample_settings import SETTINGS

    return {name: getattr(args, name) for name in SETTINGS}


def cmd_export(args) -> int:
    from .export.package import export_sampler

    path = export_sampler(args.ckpt, args.out, tokenizer=args.tokenizer, max_batch=args.batch,
                          static_batch=args.static_batch, device=args.device, compile=not args.no_compile,
                          precision=_precision(args), **_sampling_overrides(args))
    log.info("wrote %s and its packages; sample with: semanticist-fast sample --compiled %s", path, args.out)
    return 0


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="AOTInductor packages of the sampler's steps, for `sample --compiled`",
                       formatter_class=_FORMAT)
    x.add_argument("ckpt", help="AR checkpoint (folder or file) or run directory")
    x.add_argument("--out", required=True, help="directory for the packages and manifest.json")
    x.add_argument("--batch", type=_positive("--batch"), default=8, help="the largest batch the packages take")
    x.add_argument("--static-batch", action="store_true",
                   help="compile for exactly --batch images, not a dynamic batch of 1..--batch")
    x.add_argument("--no-compile", action="store_true",
                   help="write the traced programs uncompiled (torch.export.save): no C++ compiler needed, eager speed")
    _add_sampling_args(x)
    x.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    _add_precision_arg(x)
    x.set_defaults(fn=cmd_export)


def cmd_demo(args) -> int:
    if args.tokenizer is None and args.ar is None:
        raise UsageError("demo: give --tokenizer RUN, --ar RUN (the demo then uses its tokenizer) or both")
    try:
        from .demo.app import launch
    except ModuleNotFoundError as e:
        if e.name not in ("gradio", "matplotlib"):
            raise
        raise RuntimeError(f"the demo needs {e.name}: pip install -c constraints.txt -e .[demo]") from None
    import torch

    from .config import load_config
    from .demo.handlers import DemoLimits, load_models

    limits = load_config(DemoLimits, None, args.limit)  # before the models load: a bad key fails at once
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes, one line each
    torch.set_num_threads(args.threads)
    if args.compiled and args.precision:
        raise UsageError("demo --compiled: the export fixed the precision of the generation tab; drop --precision "
                         "(or re-export with it)")
    models = load_models(args.tokenizer, args.ar, args.compiled, args.device, precision=_precision(args),
                         limits=limits)
    log.info("serving the demo on http://%s:%d (Ctrl-C stops it)", args.host, args.port)
    try:
        launch(models, args.host, args.port)
    except KeyboardInterrupt:  # Ctrl-C while Gradio still finishes its start-up (the page may already be served)
        log.info("stopped")
    return 0


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the browser demos: reconstructions from the first k tokens, class-conditional "
                                    "samples (Gradio: pip install -e .[demo])", formatter_class=_FORMAT)
    d.add_argument("--tokenizer", default=None,
                   help="tokenizer run directory, checkpoint or weights file (default: the one --ar was trained on)")
    d.add_argument("--ar", default=None, help="AR run directory or checkpoint: turns on the generation tab")
    d.add_argument("--compiled", default=None, metavar="DIR",
                   help="an exported directory (semanticist-fast export): the generation tab samples with it")
    d.add_argument("--host", default="127.0.0.1",
                   help="address to serve on; 0.0.0.0 opens the demo to the network")
    d.add_argument("--port", type=_positive("--port"), default=7860, help="port to serve on")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    _add_precision_arg(d)
    d.add_argument("--threads", type=_positive("--threads"), default=1,
                   help="CPU threads for the model calls: the tiny models answer fastest on one; raise it for "
                        "large models on a CPU")
    d.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                   help="raise or lower a bound on one request's work, e.g. flow_steps=1000 or request_seconds=600 "
                        "(repeatable; the keys and defaults: README, Browser demo)")
    d.set_defaults(fn=cmd_demo)


def _eval_config(args):
    from .common.runs import saved_config
    from .eval.eval_config import resolve_eval_config

    flags = {name: getattr(args, name, None) for name in
             ("inception_path", "reference", "reference_images", "num_images", "per_class", "tokens", "shard_size",
              "seed")}
    if args.eval_kind == "gen":  # gen's --tokens is the sampling setting (first k tokens), not eval.tokens
        flags.pop("tokens")
    return resolve_eval_config(saved_config(args.ckpt), args.config, args.overrides, **flags)


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="rFID / PSNR / SSIM of a tokenizer, gFID / IS of an AR model (torch-fidelity; "
                                    "seeded, resumable, split across ranks under torchrun)", formatter_class=_FORMAT)
    kinds = e.add_subparsers(dest="eval_kind", required=True, help="recon (a tokenizer) or gen (an AR model)")
    add_eval_recon_parser(kinds)
    add_eval_gen_parser(kinds)


def cmd_eval_recon(args) -> int:
    from .eval.recon_eval import evaluate_reconstruction, format_recon_summary

    summary = evaluate_reconstruction(args.ckpt, _eval_config(args), args.out, args.guidance, args.steps,
                                      args.device, args.codec_path, progress=not args.no_progress,
                                      precision=_precision(args))
    if summary is not None:  # rank 0
        print(format_recon_summary(summary))
    return 0


def add_eval_recon_parser(kinds) -> None:
    er = kinds.add_parser("recon", help="rFID, PSNR and SSIM of reconstructions of the run's held-out images",
                          formatter_class=_FORMAT)
    _add_eval_args(er)
    er.add_argument("--tokens", default=None, help="token counts to score, e.g. 1,2,4,all (eval.tokens; default all)")
    er.add_argument("--num-images", type=int, default=None, help="held-out images to use (eval.num_images; 0: all)")
    er.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                    help="decoder guidance (default: the config's model.diffusion.guidance)")
    er.add_argument("--steps", default=None, help="decoder steps (default: the config's model.diffusion.sample_steps)")
    er.add_argument("--codec-path", default=None, help="KL-16 VAE directory, if it moved since training")
    er.set_defaults(fn=cmd_eval_recon)


def cmd_eval_gen(args) -> int:
    from .eval.gen_eval import evaluate_generation, format_gen_summary

    summary = evaluate_generation(args.ckpt, _eval_config(args), args.out, args.tokenizer, args.device,
                                  progress=not args.no_progress, precision=_precision(args),
                                  **_sampling_overrides(args))
    if summary is not None:  # rank 0
        print(format_gen_summary(summary))
    return 0


def add_eval_gen_parser(kinds) -> None:
    eg = kinds.add_parser("gen", help="gFID and IS of class-balanced samples from an AR checkpoint",
                          formatter_class=_FORMAT)
    _add_eval_args(eg)
    eg.add_argument("--per-class", type=_positive("--per-class"), default=None, help="samples per class (eval.per_class; default 50)")
    eg.add_argument("--reference-images", type=int, default=None,
                    help="without --reference: training images for the statistics (0: as many as samples)")
    _add_sampling_args(eg)
    eg.set_defaults(fn=cmd_eval_gen)


def version_text() -> str:
    import platform

    import torch

    from .kernels import extension

    lines = [f"semanticist-fast {_package_version()}",
             f"torch {torch.__version__} (python {platform.python_version()})",
             f"CUDA: {'available, ' + str(torch.cuda.device_count()) + ' device(s), CUDA ' + str(torch.version.cuda) if torch.cuda.is_available() else 'not available' + (' (torch built with CUDA ' + torch.version.cuda + ')' if torch.version.cuda else ' (CPU build of torch)')}",
             f"extension: {extension.STATUS}"]
    for name in ("triton", "deepspeed", "flash_attn"):
        try:
            module = __import__(name)
            lines.append(f"{name}: {getattr(module, '__version__', 'installed')}")
        except Exception:  # an optional package that is absent, or present but broken here
            lines.append(f"{name}: not installed")
    return "\n".join(lines)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("semanticist-fast")
    except PackageNotFoundError:
        return "(not installed)"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["bf16", "tf32", "fp32"], default=None,
                   help="on a GPU: bf16 (default: bf16 autocast, TF32 matmuls), tf32 (fp32 tensors, TF32 matmuls) or "
                        "fp32 (full fp32); the CPU always runs fp32")


def _precision(args) -> str:
    return args.precision or "bf16"


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .common.sample_settings import sample_options

    # One option per SampleConfig field, with its help; unset ones take the checkpoint's `sample` section.
    for o in sample_options():
        kind = _positive(o.flags[0]) if o.kind is int else o.kind
        p.add_argument(*o.flags, dest=o.name, type=kind, choices=o.choices, default=None,
                       help=f"{o.help} (default: the run's sample.{o.name})")
    p.add_argument("--tokenizer", default=None,
                   help="decode with this tokenizer instead of the one the AR model was trained on (pinned by sha256)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint (folder or file) or run directory")
    p.add_argument("--out", default=None, help="output directory (default: RUN/eval/<checkpoint>/<recon|gen>); "
                                               "a killed run continues in it")
    p.add_argument("--inception-path", default=None,
                   help="torch-fidelity's InceptionV3 weights, weights-inception-2015-12-05-6726825d.pth "
                        "(eval.inception_path; never downloaded)")
    p.add_argument("--reference", default=None,
                   help="FID reference: an ADM-style .npz (mu/sigma, or images arr_0) (default: the run's own images)")
    p.add_argument("--shard-size", type=_positive("--shard-size"), default=None,
                   help="images per shard and batch (eval.shard_size)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (eval.seed)")
    p.add_argument("--config", default=None, help="a YAML file whose `eval:` section applies over the run's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    _add_precision_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="eval.key=value overrides, e.g. eval.is_splits=5")


# One function per subcommand, beside its handler; in the order `--help` lists them.
SUBCOMMANDS = (add_train_parser, add_plan_parser, add_cache_parser, add_reconstruct_parser, add_convert_parser,
               add_sample_parser, add_eval_parser, add_export_parser, add_demo_parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semanticist-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_VersionAction, help="print the package, torch, CUDA and extension status")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return p


def _exit_code(error: BaseException) -> int:
    from .config import ConfigError

    return 2 if isinstance(error, (ConfigError, UsageError)) else 1


def main(argv=None) -> int:
    from .common.launcher import die_with_launcher

    die_with_launcher()  # before anything slow: a launcher killed during start-up leaves no rank behind
    parser = build_parser()
    # Overrides may follow options (`train CFG --out DIR a.b=1`), which plain argparse would refuse.
    args, extra = parser.parse_known_args(argv)
    if args.fn is cmd_train:  # before the heavy imports: a stop signal during start-up waits for the training loop
        from .common import signals
        signals.hold()
    from .common.distributed import ranks_from_env
    from .engine.trainer import EXIT_RESUMABLE, StopRequested

    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    ranks = ranks_from_env()
    rank, world = ranks.rank, ranks.world_size
    # Ranks other than 0 report only problems, each line naming its rank.
    level = logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING)
    where = f" rank {rank}" if world > 1 else ""
    logging.basicConfig(level=level, format=f"%(asctime)s{where} %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except StopRequested as e:
        print(str(e), file=sys.stderr)
        return EXIT_RESUMABLE
    except KeyboardInterrupt:
        print("interrupted: the newest checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:  # every error ends in one line (the traceback with --debug)
        if args.debug:
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, (RuntimeError, OSError)) and type(e).__name__ not in message:
            message = f"{type(e).__name__}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
