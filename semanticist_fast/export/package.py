"""`semanticist-fast export`: an AR checkpoint and its tokenizer -> a directory of AOTInductor packages + manifest.

    DIR/ar_prefill.pt2  ar_decode.pt2  head_step.pt2  decoder_step.pt2  latent_decode.pt2  manifest.json

Each package is one step of the sampler (semanticist_fast/export/steps.py), traced by `torch.export.export` and
compiled by `torch._inductor.aoti_compile_and_package` for the device it was exported on (or, with
compile=False, the traced program uncompiled: `--no-compile`). The batch dimension is
dynamic (1..max batch) unless `static_batch`; with class guidance the AR and head steps run 2 * batch rows.
The manifest, written last (a crash leaves none, and the directory is then not loadable), holds the shapes and
dtypes of every program, the geometry and samplers the runtime needs, the sampling settings, and the sha256 of
both checkpoints. Sampler choices (steps, samplers, guidance scales) stay free at sampling time, except whether
guidance is on at all: the CFG batch is part of the traced graphs.
"""
import contextlib
import inspect
import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..common.device import effective_precision, resolve_device
from ..common.files import atomic_write, atomic_write_text, sha256_file
from ..common.runs import weights_file
from ..common.sample_settings import tokens_to_generate
from ..config import to_dict
from ..inference import Tokenizer, load_generator
from ..inference.generation import with_overrides
from ..kernels import dispatch
from .steps import ARDecode, ARPrefill, Autocast, DecoderStep, HeadStep, LatentDecode

FORMAT_VERSION = 1
PROGRAMS = ("ar_prefill", "ar_decode", "head_step", "decoder_step", "latent_decode")


@contextlib.contextmanager
def plain_pytorch_paths():
    """Trace through the reference ops only: a package must not call into our C++ extension, Triton or flash-attn."""
    previous = dispatch.fast_paths_enabled()
    dispatch.set_fast_paths(False)
    try:
        yield
    finally:
        dispatch.set_fast_paths(previous)


def _spec(name: str, tensor: torch.Tensor, batch_dim: Optional[str]) -> dict:
    shape = [batch_dim if (i == 0 and batch_dim) else int(n) for i, n in enumerate(tensor.shape)]
    return {"name": name, "shape": shape, "dtype": str(tensor.dtype).removeprefix("torch.")}


def _package(module: torch.nn.Module, args: tuple, names: list[str], batch_dims: list[Optional[str]],
             dims: dict, path: Path, compile: bool) -> dict:
    """Export module(*args) with the named batch dims dynamic (or none, when dims is empty) and write path: the
    AOTInductor package, or with compile=False the exported program itself (torch.export.save).

    The caches of the AR steps are the forward's *caches: torch.export wants their specs as one nested tuple.
    """
    dynamic = None
    if dims:
        specs = [{0: dims[d]} if d else None for d in batch_dims]
        parameters = inspect.signature(module.forward).parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):
            named = len(parameters) - 1
            dynamic = (*specs[:named], tuple(specs[named:]))
        else:
            dynamic = tuple(specs)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic)
        out = program.module()(*args)
        if compile:
            atomic_write(path, lambda f: torch._inductor.aoti_compile_and_package(program, package_path=f))
        else:
            atomic_write(path, lambda f: torch.export.save(program, f))
    return {"file": path.name,
            "inputs": [_spec(n, a, d) for n, a, d in zip(names, args, batch_dims)],
            "outputs": [_spec("out", out, batch_dims[0])]}


def export_sampler(ar_checkpoint: Union[str, Path], out_dir: Union[str, Path], tokenizer: Optional[str] = None,
                   max_batch: int = 8, static_batch: bool = False, device: Optional[str] = None,
                   compile: bool = True, progress: bool = True, precision: str = "bf16", **sample_overrides) -> Path:
    """Write the packages and manifest.json into out_dir; return the manifest's path.

    tokenizer: default, the one the AR run was trained on. max_batch: the largest batch (the only one, with
    static_batch). compile=False writes the exported programs uncompiled (torch.export.save): no C++ compiler
    needed, eager speed; the runtime runs them alike. sample_overrides: SampleConfig fields (guidance, head_steps,
    decoder_steps, ...) replacing the run's sampling settings; they are stored as the package's defaults.
    precision (a CUDA export; a CPU export is fp32): bf16 traces the steps under bf16 autocast (bf16 KV caches, fp32
    outputs), and the runtime runs them with TF32 on, as it does for tf32; fp32 keeps both off.
    """
    if max_batch < 1:
        raise ValueError(f"--batch must be >= 1, got {max_batch}")
    device = resolve_device(device)
    precision = effective_precision(device, precision)
    loaded = load_generator(ar_checkpoint, str(device))
    gpt = loaded.gpt.eval()
    tokenizer_path = tokenizer or loaded.tokenizer_file()  # the pinned tokenizer unless one is given
    tok = Tokenizer.from_checkpoint(tokenizer_path, device=str(device))
    tcfg = tok.config
    s = with_overrides(loaded.sample, **sample_overrides)
    s = with_overrides(s, head_steps=s.head_steps or gpt.diffloss.sample_steps,
                       decoder_guidance=tcfg.diffusion.guidance if s.decoder_guidance is None else s.decoder_guidance,
                       decoder_steps=str(s.decoder_steps or tcfg.diffusion.sample_steps))
    gpt.diffloss.sampling.check(s.sampler)
    tokens_to_generate(s.tokens, gpt.num_tokens)  # a k outside 1..N fails now, not after the compiles
    tok.process.sampler(s.decoder_steps)  # an unknown decoder steps spec fails now, not after the compiles
    if gpt.config.token_dim != tcfg.encoder.slot_dim or gpt.num_tokens > tok.num_slots:
        raise ValueError(f"the AR model draws {gpt.num_tokens} tokens of {gpt.config.token_dim} dims, but the "
                         f"tokenizer {tokenizer_path} has {tok.num_slots} slots of {tcfg.encoder.slot_dim}: pass the "
                         f"AR model's own tokenizer as --tokenizer")
    guided, decoder_guided = s.guidance != 1.0, s.decoder_guidance != 1.0

    example = max_batch if static_batch else max(2, max_batch)
    dims = {}
    if not static_batch:
        batch = torch.export.Dim("batch", min=1, max=example)
        dims = {"batch": batch, "2*batch": 2 * batch}
    rows_dim = "2*batch" if guided else "batch"
    rows = 2 * example if guided else example
    head, dit = gpt.diffloss, tok.model.dit
    cache_shape = gpt.cache_shape(rows)
    dtype = torch.bfloat16 if precision == "bf16" else gpt.z_proj.weight.dtype  # the K/V dtype under autocast
    caches = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in range(2 * len(gpt.layers))]
    cache_names = [f"{kind}_cache_{i}" for i in range(len(gpt.layers)) for kind in ("k", "v")]
    cond_emb = torch.randn(rows, head.net.cond_embed.out_features, device=device)
    latent = (dit.in_channels, dit.grid * dit.patch_size, dit.grid * dit.patch_size)
    tokens = torch.randn(example, gpt.num_tokens, gpt.config.token_dim, device=device)
    guidance = [torch.tensor(2.0, device=device)]

    def jobs():
        labels = torch.arange(rows, device=device) % gpt.num_classes
        yield "ar_prefill", ARPrefill(gpt), (labels, *caches), ["labels", *cache_names], [rows_dim] * (1 + len(caches))
        token = torch.randn(rows, 1, gpt.config.token_dim, device=device)
        pos = torch.tensor([1], device=device)
        yield ("ar_decode", ARDecode(gpt), (token, pos, *caches), ["token", "input_pos", *cache_names],
               [rows_dim, None] + [rows_dim] * len(caches))
        x = torch.randn(example, gpt.config.token_dim, device=device)
        t = torch.tensor([0.5], device=device)
        yield ("head_step", HeadStep(gpt, guided), (x, t, cond_emb, *guidance[:guided]),
               ["x", "t", "cond_emb", "guidance"][:3 + guided], ["batch", None, rows_dim, None][:3 + guided])
        xl = torch.randn(example, *latent, device=device)
        tl = torch.full((example,), 500.0, device=device)
        count = torch.tensor([gpt.num_tokens], device=device)  # an input: any k of the sample's `tokens`
        yield ("decoder_step", DecoderStep(tok.model, decoder_guided),
               (xl, tl, tokens, count, *guidance[:decoder_guided]),
               ["x", "t", "tokens", "num_tokens", "guidance"][:4 + decoder_guided],
               ["batch", "batch", "batch", None, None][:4 + decoder_guided])
        yield "latent_decode", LatentDecode(tok.codec), (xl,), ["latents"], ["batch"]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # the old manifest must not describe new packages
    programs = {}
    from tqdm.auto import tqdm
    with plain_pytorch_paths():
        bar = tqdm(list(jobs()), desc="export", disable=not progress)
        for name, module, args, names, batch_dims in bar:
            bar.set_postfix_str(name)
            if precision == "bf16":
                module = Autocast(module, device.type)
            programs[name] = _package(module.eval(), args, names, batch_dims, dims, out_dir / f"{name}.pt2", compile)

    ar_path, tok_path = weights_file(ar_checkpoint), weights_file(tokenizer_path)
    d = tcfg.diffusion
    manifest = {
        "format": FORMAT_VERSION,
        "torch": torch.__version__,
        "device": device.type,
        "compiled": compile,
        "precision": precision,
        "batch": {"min": example if static_batch else 1, "max": example},
        "programs": programs,
        "ar": {"num_tokens": gpt.num_tokens, "token_dim": gpt.config.token_dim, "num_classes": gpt.num_classes,
               "layers": len(gpt.layers), "cache_shape": list(cache_shape[1:]),
               "cache_dtype": str(dtype).removeprefix("torch."), "guided": guided},
        "head": {"objective": head.objective, "token_dim": head.token_dim, "default_steps": head.sample_steps,
                 "ddpm_schedule": head.ddpm_schedule, "ddpm_timesteps": head.ddpm_timesteps},
        "decoder": {"guided": decoder_guided, "latent_shape": list(latent),
                    "process": {"objective": d.objective, "num_timesteps": d.num_timesteps,
                                "noise_schedule": d.noise_schedule, "learn_sigma": tcfg.decoder.learn_sigma,
                                "flow_t_mean": d.flow_t_mean, "flow_t_std": d.flow_t_std}},
        "sample": to_dict(s),
        "checkpoints": {"autoregressive": {"path": str(ar_path), "sha256": sha256_file(ar_path)},
                        "tokenizer": {"path": str(tok_path), "sha256": sha256_file(tok_path)}},
    }
    path = out_dir / "manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path
