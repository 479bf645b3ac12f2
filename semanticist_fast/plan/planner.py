"""`semanticist-fast plan`: what the run `train CONFIG` would start costs, before it is launched.

Parameters and FLOPs come from the models built on the meta device and from flops.py; activation memory from a
traced step of the real model and loss (trace.py); the optimizer state from how the engines keep it (fp32 weights,
fp32 AdamW moments and EMA, partitioned by ZeRO stage as engine/zero.py configures DeepSpeed); time from the
MFU the results store measured for this model on this GPU (bench_train records), else an assumed MFU, said so;
communication from comm.py; disk from the caches' formats (data/latent_cache.py, data/token_cache.py) and the
checkpoint layout (engine/checkpoint.py). Nothing is loaded: no weights, no images.
"""
import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..data.loader import steps_per_epoch
from ..data.transforms import num_views
from ..models.dinov2 import DinoV2, DinoV2Config
from ..models.latent_codec import KL16Codec, PixelCodec, codec_geometry
from ..models.tokenizer import build_decoder_process
from ..models.vae_kl import AutoencoderKL, VAEConfig
from ..tasks.autoregressive_stage import ARTask
from ..tasks.tokenizer_stage import TokenizerTask
from . import flops
from .comm import zero_comm
from .hardware import GPUS_PER_NODE, HEADROOM, KNOWN_DATASETS, gpu_named
from .trace import trace_step

ASSUMED_MFU = 0.40  # bench_scaling's assumption too; replaced by a measured one when the store has it
DEFAULT_STORE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "history.jsonl"
NODE_COUNTS = (1, 2, 4, 8, 16, 32)


# ---- the task, weightless ------------------------------------------------------------------------------------------

def build_task(run):
    """(task, make_batch(m), frozen module names) of the run, on the meta device: the task's own model and loss,
    its frozen codec and teacher as the architectures the config names (no weights read)."""
    meta = torch.device("meta")
    with meta:
        if run.kind == "tokenizer":
            cfg = run.model
            codec = PixelCodec() if cfg.codec.kind == "pixel" else \
                KL16Codec(cfg.codec, vae=AutoencoderKL(VAEConfig(latent_channels=cfg.codec.latent_channels)))
            teacher = DinoV2(DinoV2Config()).requires_grad_(False).eval() if cfg.repa.teacher_path else None
            task = TokenizerTask(run, meta, None, codec=codec, teacher=teacher)
            channels, side = codec_geometry(cfg.codec, cfg.image_size)
            size, latents = cfg.image_size, bool(run.data.latents)

            def make_batch(m: int):
                batch = (torch.rand(m, 3, size, size), torch.zeros(m, dtype=torch.long))
                if latents:  # the cache's posterior, read as float32 (data/latent_cache.py)
                    batch += (torch.randn(m, channels, side, side), torch.randn(m, channels, side, side))
                return batch
            frozen = ["codec"] + (["teacher"] if teacher is not None else [])
        else:
            task = ARTask(run, meta, None)
            cfg = run.model

            def make_batch(m: int):
                return torch.randn(m, cfg.num_tokens, cfg.token_dim), torch.zeros(m, dtype=torch.long)
            frozen = []
    if run.kind == "tokenizer":  # the diffusion's schedule tables: small, real CPU tensors
        task.process = build_decoder_process(run.model)
    return task, make_batch, frozen


def _numel(module: Optional[torch.nn.Module], trainable: Optional[bool] = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _buffer_bytes(module: Optional[torch.nn.Module]) -> int:
    return 0 if module is None else sum(b.numel() * b.element_size() for b in module.buffers())


# ---- the pieces of a plan ------------------------------------------------------------------------------------------

def dataset_images(run, images: Optional[int]) -> tuple[int, str]:
    """Training images (what the training set's len() is: one item per image, with or without a cache) and
    where the number came from."""
    if images is not None:
        return images, "--images"
    if run.data.dataset == "procedural":
        return run.data.num_items, "data.num_items"
    root = run.data.root.lower()
    for name, count in KNOWN_DATASETS.items():
        if name in root:
            return count, f"{name} train (data.root={run.data.root})"
    raise ConfigError(f"plan: how many training images does data.root={run.data.root} hold? pass --images N")


def measured_mfu(gpu_name: str, trained_flops: int, store: Path) -> Optional[dict]:
    """The newest bench_train record of this GPU for a model of these trained FLOPs per image (the same model
    size), as {mfu, date, commit, device}; None without one."""
    if not store.is_file():
        return None
    found = None
    for line in store.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("benchmark") != "bench_train" or gpu_name not in str(record.get("device", "")):
            continue
        for row in record.get("results", []):
            mfu = (row.get("optimised") or {}).get("mfu")
            if row.get("trained_flops_per_image") == trained_flops and mfu:
                found = {"mfu": mfu, "date": record.get("date"), "commit": record.get("commit"),
                         "device": record.get("device"), "workload": row.get("workload")}
    return found


def state_bytes(train, trainable: int, frozen_in_model: int, model_buffers: int, world: int) -> dict:
    """Bytes per GPU of what lives through the whole run, by ZeRO stage (engine/zero.py, engine/trainer.py)."""
    P, full = trainable, 4 * (trainable + frozen_in_model) + model_buffers
    if train.engine == "single":
        # The model, its gradients, the fused AdamW's two moments, the EMA in a deep copy of the model.
        return {"weights": full, "master_weights": 0, "gradients": 4 * P, "adam_moments": 8 * P, "ema": full,
                "grad_buckets": 0, "offloaded_to_host": 0}
    z, stage = train.zero, train.zero_stage
    part = 4 * P / world
    out = {"weights": full if stage < 3 else full / world + 4 * z.prefetch_bucket_size,
           "master_weights": part, "gradients": 4 * P if stage == 1 else part, "adam_moments": 2 * part,
           "ema": part,  # the EMA clones this rank's fp32 slices (engine/ema.py)
           # DeepSpeed's contiguous reduction buffers: reduce_bucket_size elements each, two with overlap_comm.
           "grad_buckets": (4 * z.reduce_bucket_size * (2 if z.overlap_comm else 1)
                            if z.contiguous_gradients or stage == 3 else 0),
           "offloaded_to_host": 0}
    if z.offload_optimizer == "cpu":  # master weights, moments and the EMA cloned from them live in host memory
        out["offloaded_to_host"] = out["master_weights"] + out["adam_moments"] + out["ema"]
        out["master_weights"] = out["adam_moments"] = out["ema"] = 0
    return out


def peak_bytes(state: dict, frozen_bytes: int, trace, accum: int, full_grads: bool) -> int:
    """The step's peak per GPU: what always lives, plus the traced step. Full gradients (one process, ZeRO-1)
    appear during the backward of a lone micro-step (the trace's own peak) but are all there from the second
    micro-step of an accumulation on; ZeRO-2/3 keep partitioned ones (in `state`)."""
    static = sum(v for k, v in state.items() if k not in ("gradients", "offloaded_to_host")) + frozen_bytes
    if full_grads:
        dynamic = trace.peak_bytes if accum == 1 else state["gradients"] + trace.peak_without_grads_bytes
        dynamic = max(dynamic, state["gradients"])  # the optimizer step: every gradient at once
    else:
        dynamic = state["gradients"] + trace.peak_without_grads_bytes
    return int(static + dynamic)


def largest_micro_batch(per_rank: int, fits) -> Optional[int]:
    """The largest micro-batch that divides the rank's share of the global batch and fits."""
    best = None
    for m in range(1, per_rank + 1):
        if per_rank % m == 0 and fits(m):
            best = m
    return best


# ---- the plan ------------------------------------------------------------------------------------------------------

def make_plan(run, gpus: int = 1, nodes: int = 1, gpu: str = "h100", images: Optional[int] = None,
              mfu: Optional[float] = None, views: Optional[str] = None, store: Optional[Path] = None) -> dict:
    """Everything `semanticist-fast plan` prints, as a dict (the --json output)."""
    train = run.train
    if gpus % nodes:
        raise ConfigError(f"--gpus {gpus} does not split over --nodes {nodes}")
    if train.engine == "single" and gpus > 1:
        raise ConfigError(f"train.engine=single runs one process, but --gpus {gpus}: set train.engine=deepspeed "
                          "(as `train` would ask)")
    hw = gpu_named(gpu)
    try:
        micro, accum = train.batch_plan(gpus)
    except ValueError as e:  # what `train` would refuse on this many ranks
        raise ConfigError(str(e)) from None
    bf16 = train.precision == "bf16"

    task, make_batch, frozen = build_task(run)
    model = task.model
    trainable, frozen_in_model = _numel(model, True), _numel(model, False)
    frozen_modules = {name: getattr(task, name) for name in frozen}
    frozen_params = {name: _numel(m) for name, m in frozen_modules.items()}
    frozen_bytes = sum(n * (2 if bf16 else 4) for n in frozen_params.values()) + \
        sum(_buffer_bytes(m) for m in frozen_modules.values())
    model_buffers = _buffer_bytes(model)

    # Two traced steps: at the config's micro-batch, and at half of it, for the line through them.
    traces = {}
    for m in sorted({micro, max(1, micro // 2)} if micro > 1 else {1, 2}):
        fresh, batch_fn, names = build_task(run)
        traces[m] = trace_step(fresh, batch_fn, m, train.batch_size, bf16, names)
    trace = traces[micro]
    (m0, t0), (m1, t1) = sorted(traces.items())[:2]
    per_image = (t1.peak_without_grads_bytes - t0.peak_without_grads_bytes) / (m1 - m0)
    base = t0.peak_without_grads_bytes - per_image * m0

    state = state_bytes(train, trainable, frozen_in_model, model_buffers, gpus)
    full_grads = train.engine == "single" or train.zero_stage == 1
    peak = peak_bytes(state, frozen_bytes, trace, accum, full_grads)
    budget = hw.memory_bytes * (1 - HEADROOM)

    class _Line:  # the trace's line at micro-batch m
        def __init__(self, m):
            self.peak_without_grads_bytes = base + per_image * m
            self.peak_bytes = self.peak_without_grads_bytes + state["gradients"]

    per_rank = train.batch_size // gpus
    fit = largest_micro_batch(per_rank, lambda m: peak_bytes(state, frozen_bytes, _Line(m),
                                                             per_rank // m, full_grads) <= budget)

    # FLOPs and time.
    if run.kind == "tokenizer":
        counts = flops.tokenizer_step(run.model, repa=bool(run.model.repa.teacher_path))
        trained = counts["trained_fwd_bwd"]
        frozen_flops = {"vae_encoder_fwd": counts["vae_encoder_fwd"], "teacher_fwd": counts["teacher_fwd"]}
        with_cache = trained + counts["teacher_fwd"]
        without_cache = with_cache + counts["vae_encoder_fwd"]
        step_flops = with_cache if run.data.latents else without_cache
    else:
        counts = flops.ar_step(run.model)
        trained = counts["total"]
        frozen_flops = {}
        with_cache = without_cache = step_flops = trained  # the token cache replaces the tokenizer's encoder
    record = measured_mfu(hw.name, trained, Path(store) if store else DEFAULT_STORE)
    if mfu is not None:
        mfu_used, mfu_source = mfu, "given (--mfu)"
    elif record is not None:
        mfu_used, mfu_source = record["mfu"], (f"measured: bench_train {record['workload']} on {record['device']}, "
                                               f"{record['date']} ({record['commit']})")
    else:
        mfu_used, mfu_source = ASSUMED_MFU, "ASSUMED (no bench_train record of this model on this GPU)"
    peak_flops = hw.peak_bf16_tflops * 1e12 * (1.0 if bf16 else 0.5)  # fp32 runs matmuls in TF32: half the rate
    num_images, images_source = dataset_images(run, images)
    steps = steps_per_epoch(num_images, train.batch_size)

    def timing(n_gpus: int, n_nodes: int) -> dict:
        link = (hw.nvlink_GBps if n_nodes == 1 else hw.infiniband_GBps) * 1e9
        m = min(micro, train.batch_size // n_gpus)  # more GPUs than the config's micro-batch splits over: fewer each
        if n_gpus > 1:
            comm = zero_comm(trainable, step_flops, train.batch_size, n_gpus, m, peak_flops, mfu_used, link)
            eff = comm[f"zero{train.zero_stage}"]["efficiency"]
        else:
            eff = 1.0
        per_gpu = mfu_used * peak_flops / step_flops
        rate = n_gpus * per_gpu * eff
        hours = steps * train.batch_size / rate / 3600
        return {"gpus": n_gpus, "nodes": n_nodes, "micro_batch": m, "comm_efficiency": eff, "images_per_s": rate,
                "hours_per_epoch": hours, "gpu_hours_per_epoch": hours * n_gpus,
                "hours_total": hours * train.epochs}

    per_node = gpus // nodes
    scaling = []
    for n in NODE_COUNTS:
        n_gpus = n * per_node
        if (train.engine == "single" and n_gpus > 1) or train.batch_size % n_gpus or \
                (train.batch_size // n_gpus) % min(micro, train.batch_size // n_gpus):
            continue  # the global batch does not split over that many GPUs
        scaling.append(timing(n_gpus, n))

    # Disk.
    disk = {}
    if run.kind == "tokenizer" and run.model.codec.kind == "kl16":
        channels, side = codec_geometry(run.model.codec, run.model.image_size)
        v = views or "ten_crop"
        per = num_views(v) * 2 * channels * side * side * 2  # mean and logvar, fp16
        disk["latent_cache"] = {"views": v, "bytes_per_image": per, "bytes": per * num_images}
    if run.kind == "autoregressive":
        v = views or run.cache.views
        per = num_views(v) * run.model.num_tokens * run.model.token_dim * 2 + 8  # fp16 tokens, int64 label
        disk["token_cache"] = {"views": v, "bytes_per_image": per, "bytes": per * num_images}
    # Every rank's slices (fp32 weights, EMA, two moments) plus the consolidated EMA weights of the model.
    ckpt = 16 * trainable + 4 * (trainable + frozen_in_model) + model_buffers
    disk["checkpoint"] = {"bytes": ckpt, "kept": train.keep_checkpoints, "bytes_kept": ckpt * train.keep_checkpoints}

    return {
        "kind": run.kind, "gpu": gpu, "gpu_name": hw.name, "gpus": gpus, "nodes": nodes,
        "engine": train.engine, "zero_stage": train.zero_stage if train.engine == "deepspeed" else None,
        "precision": train.precision,
        "batch": {"global": train.batch_size, "micro": micro, "accumulation": accum},
        "parameters": {"trained": trainable, "frozen_in_model": frozen_in_model, "frozen": frozen_params},
        "flops_per_image": {"trained_fwd_bwd": trained, **frozen_flops, "step_with_latent_cache": with_cache,
                            "step_without_latent_cache": without_cache, "step": step_flops},
        "memory": {"state": state, "frozen_models": frozen_bytes, "activations_peak": trace.peak_without_grads_bytes,
                   "step_trace_peak": trace.peak_bytes, "activations_per_image": per_image,
                   "activations_base": base, "peak": peak, "gpu_memory": hw.memory_bytes, "headroom": HEADROOM,
                   "fits": peak <= budget, "largest_micro_batch": fit,
                   "accumulation_at_largest": per_rank // fit if fit else None},
        "time": {"mfu": mfu_used, "mfu_source": mfu_source, "peak_tflops": peak_flops / 1e12,
                 "images": num_images, "images_source": images_source, "steps_per_epoch": steps,
                 "epochs": train.epochs, **timing(gpus, nodes), "scaling": scaling},
        "disk": disk,
    }


# ---- the table -----------------------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / 2 ** 30:,.2f} GiB"


def _count(n: float) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,.0f}"


def format_plan(p: dict) -> str:
    b, mem, t, fl = p["batch"], p["memory"], p["time"], p["flops_per_image"]
    engine = p["engine"] + (f" ZeRO-{p['zero_stage']}" if p["zero_stage"] else "")
    lines = [f"plan: {p['kind']} on {p['gpus']} x {p['gpu']} ({p['nodes']} node(s)), {engine}, {p['precision']}",
             f"  batch: global {b['global']} = {p['gpus']} GPUs x micro {b['micro']} x accumulation "
             f"{b['accumulation']}", "", "parameters"]
    lines.append(f"  trained                 {_count(p['parameters']['trained'])}")
    if p["parameters"]["frozen_in_model"]:
        lines.append(f"  frozen, in the model    {_count(p['parameters']['frozen_in_model'])}")
    for name, n in p["parameters"]["frozen"].items():
        lines.append(f"  frozen {name:<16} {_count(n)}")
    lines += ["", "FLOPs per image (GFLOP)",
              f"  trained, fwd + bwd      {fl['trained_fwd_bwd'] / 1e9:,.1f}"]
    for key in ("vae_encoder_fwd", "teacher_fwd"):
        if key in fl:
            lines.append(f"  frozen {key[:-4].replace('_', ' '):<16} {fl[key] / 1e9:,.1f}")
    if p["kind"] == "tokenizer":
        lines += [f"  step, latent cache      {fl['step_with_latent_cache'] / 1e9:,.1f}",
                  f"  step, no latent cache   {fl['step_without_latent_cache'] / 1e9:,.1f}"]
    lines += ["", f"memory per GPU at micro-batch {b['micro']}"]
    for key, value in mem["state"].items():
        if value:
            lines.append(f"  {key.replace('_', ' '):<23} {_gb(value)}")
    lines += [f"  frozen models           {_gb(mem['frozen_models'])}",
              f"  activations (traced)    {_gb(mem['activations_peak'])}  "
              f"({_gb(mem['activations_per_image'])} per image)",
              f"  peak                    {_gb(mem['peak'])} of {_gb(mem['gpu_memory'])} "
              f"({'fits' if mem['fits'] else 'does NOT fit'}, {mem['headroom']:.0%} kept free)",
              f"  largest micro-batch     {mem['largest_micro_batch'] or 'none fits'}"
              + (f" (accumulation {mem['accumulation_at_largest']} keeps the global batch)"
                 if mem["largest_micro_batch"] else ""),
              "", "time",
              f"  MFU                     {t['mfu']:.0%}, {t['mfu_source']}",
              f"  peak per GPU            {t['peak_tflops']:,.0f} TFLOP/s",
              f"  images per epoch        {t['images']:,} ({t['images_source']}), {t['steps_per_epoch']:,} steps",
              f"  {'nodes':>5} {'GPUs':>5} {'micro':>5} {'comm eff':>9} {'img/s':>10} {'h/epoch':>9} {'GPU-h/epoch':>12} "
              f"{'h for ' + str(t['epochs']) + ' epochs':>16}"]
    for row in t["scaling"]:
        mark = " <" if row["gpus"] == p["gpus"] else ""
        lines.append(f"  {row['nodes']:>5} {row['gpus']:>5} {row['micro_batch']:>5} {row['comm_efficiency']:>9.1%} {row['images_per_s']:>10,.0f} "
                     f"{row['hours_per_epoch']:>9.3f} {row['gpu_hours_per_epoch']:>12.2f} {row['hours_total']:>16,.1f}"
                     f"{mark}")
    lines += ["", "disk"]
    for name, d in p["disk"].items():
        if name == "checkpoint":
            lines.append(f"  checkpoint              {_gb(d['bytes'])} each, {_gb(d['bytes_kept'])} for the "
                         f"{d['kept']} kept")
        else:
            lines.append(f"  {name.replace('_', ' '):<23} {_gb(d['bytes'])} ({d['views']}: "
                         f"{d['bytes_per_image'] / 1024:,.0f} KiB per image)")
    return "\n".join(lines)
