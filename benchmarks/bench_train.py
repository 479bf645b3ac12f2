"""One full training step (forward, backward, grad clip, AdamW, EMA), optimised against plain, on the same inputs.

    python benchmarks/bench_train.py --preset tokenizer-L --batch 64   # GPU: ViT-B + DiT-L/2, 256 px, KL-16 latents
    python benchmarks/bench_train.py --preset ar-L --batch 256         # GPU: GPT-L + head 1536x12, 32 tokens
    python benchmarks/bench_train.py --preset tiny                     # CPU smoke: both, small dims

optimised: fast kernels (Triton / C++ / flash-attn, the split slot-encoder attention), regional torch.compile of
the blocks (engine/compile.py), fused AdamW (GPU), bf16 autocast (GPU).
plain: eager, set_fast_paths(False) (the PyTorch references: SDPA with the boolean encoder mask), torch's default
unfused AdamW; bf16 autocast on GPU as well (the published recipe trains under it), or fp32 with --plain-fp32.
plain is the baseline: the reference design's training step in plain PyTorch, what a user would otherwise run.
Both models are built first; then they take turns, one step each (benchmarks/common.py:interleaved), and the
speed-up is the median of the per-round ratios, with its IQR and range (speedup_stats).
Both build the model from the same seed, see the same batch and draw the same diffusion noise, timesteps,
nested-dropout prefixes and stochastic-depth draws (drawn outside the blocks, for the global batch). Their first-step
losses differ only by:
- the random draws made inside compiled blocks: the GPT's resid and FFN nn.Dropout (0.1). Inductor generates
  those masks with its own in-kernel generator, not the eager generator's stream, so the AR losses differ by the
  dropout masks (tiny preset on CPU, fp32: 2.9e-2 relative at 36ab563; the tokenizer, with no draw inside a compiled
  block, 0.0). --same-draws compiles with torch._inductor.config.fallback_random, which makes compiled random ops
  draw from the eager generator in eager order: the tiny preset's losses are then equal to the last bit (0.0 for
  both) on CPU in fp32. It is off by default since training compiles without it and it changes the timed kernels;
  --no-compile gives equal losses as well.
- kernel rounding: bf16 autocast on GPU (the fast kernels and flash-attn round differently from the references).

The frozen parts of the tokenizer step are not run: random latents (B, 16, 16, 16) stand in for the VAE encoder and
a random (B, 256, 768) target for the DINOv2 teacher (REPA on unless --no-repa). TFLOP/s and MFU count the trained
parts only (3 x forward, semanticist_fast/plan/flops.py); MFU divides by the dense bf16 peak of the GPU (H100 SXM /
H200: 989 TFLOP/s) or --peak-tflops. Peak memory, per variant over its build, first and warm-up steps (both
variants stay alive to take turns): torch.cuda.max_memory_allocated less what was allocated before its build on GPU; on CPU the
process's peak RSS, the other variant included: a rough figure.
Appends a record to the results store (benchmarks/results/history.jsonl) unless --no-write.
"""
import argparse
import gc
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semanticist_fast.plan import flops  # noqa: E402
from benchmarks.common import (add_record_arguments, check_clean, describe_device, format_ratio,  # noqa: E402
                               interleaved, ratio_stats, sync, write_result)
from semanticist_fast.engine.ema import EMA  # noqa: E402
from semanticist_fast.engine.optimizer import build_adamw, param_groups  # noqa: E402
from semanticist_fast.engine.compile import compile_blocks  # noqa: E402
from semanticist_fast.kernels.dispatch import fast_paths_enabled, set_fast_paths  # noqa: E402
from semanticist_fast.models.dit import DecoderConfig  # noqa: E402
from semanticist_fast.models.gpt import GPTConfig  # noqa: E402
from semanticist_fast.models.latent_codec import CodecConfig, codec_geometry  # noqa: E402
from semanticist_fast.models.tokenizer import TokenizerConfig  # noqa: E402
from semanticist_fast.models.vit import EncoderConfig  # noqa: E402
from semanticist_fast.tasks.autoregressive_stage import ARRun, ARTask  # noqa: E402
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun, TokenizerTask  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0}  # dense, by device-name substring
NESTING_EPOCH = 10 ** 9  # past enable_nest_after: the step draws per-sample prefixes, as most of training does


class FixedOutput(torch.nn.Module):
    """Stands in for a frozen model (codec or REPA teacher): returns the same tensor for any input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def encode(self, images: torch.Tensor, rng=None) -> torch.Tensor:
        return self.out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out


class SyntheticTokenizerTask(TokenizerTask):
    """TokenizerTask's training loss, with the frozen codec and teacher replaced by fixed outputs."""

    def __init__(self, run: TokenizerRun, device: torch.device, latents: torch.Tensor,
                 target: Optional[torch.Tensor]):
        super().__init__(run, device, None, codec=FixedOutput(latents),
                         teacher=FixedOutput(target) if target is not None else None)


@dataclass
class Workload:
    name: str
    batch: int
    grad_clip: float
    flops: dict[str, int]  # per image, from semanticist_fast/plan/flops.py
    trained_flops: int  # per image, forward + backward of the trained parts
    # (device, size, generator) -> (the loader's batch, fixed outputs of the frozen models)
    make_inputs: Callable[[torch.device, int, torch.Generator], tuple[tuple, tuple]]
    make_task: Callable[[torch.device, tuple], object]  # (device, frozen outputs) -> task with .model and .loss


def tokenizer_workload(name: str, cfg: TokenizerConfig, batch: int, repa: bool, teacher_grid: int,
                       teacher_dim: int) -> Workload:
    channels, size = codec_geometry(cfg.codec, cfg.image_size)
    if not repa:
        cfg = replace(cfg, decoder=replace(cfg.decoder, repa_block=0))
    run = TokenizerRun(model=cfg)
    counts = flops.tokenizer_step(cfg, repa=repa)

    def make_inputs(device, n, gen):
        images = torch.rand(n, 3, cfg.image_size, cfg.image_size, device=device, generator=gen)
        latents = torch.randn(n, channels, size, size, device=device, generator=gen)
        target = torch.randn(n, teacher_grid ** 2, teacher_dim, device=device, generator=gen) if repa else None
        return (images,), (latents, target)

    def make_task(device, frozen):
        return SyntheticTokenizerTask(run, device, *frozen)

    return Workload(name, batch, 3.0, counts, counts["trained_fwd_bwd"], make_inputs, make_task)


def ar_workload(name: str, cfg: GPTConfig, batch: int) -> Workload:
    run = ARRun(model=cfg)
    counts = flops.ar_step(cfg)

    def make_inputs(device, n, gen):
        tokens = torch.randn(n, cfg.num_tokens, cfg.token_dim, device=device, generator=gen)
        labels = torch.randint(0, cfg.num_classes, (n,), device=device, generator=gen)
        return (tokens, labels), ()

    def make_task(device, frozen):
        return ARTask(run, device, tokenizer=None)

    return Workload(name, batch, 1.0, counts, counts["total"], make_inputs, make_task)


def presets(name: str, batch: Optional[int], repa: bool) -> list[Workload]:
    if name == "tokenizer-L":
        return [tokenizer_workload("tokenizer-L", flops.published_tokenizer_config(), batch or 64, repa, 16, 768)]
    if name == "ar-L":
        return [ar_workload("ar-L", GPTConfig(size="L", num_tokens=32), batch or 256)]
    # tiny: every code path of the large presets (drop-path ramp, REPA, nested dropout, dropout) at toy widths.
    tok = TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(size="custom", dim=32, depth=2, heads=2, patch_size=8, num_slots=8, drop_path=0.1),
        decoder=DecoderConfig(size="custom", depth=2, hidden=32, heads=2, patch_size=2, repa_block=1,
                              repa_proj_dim=32, repa_target_dim=16),
        codec=CodecConfig(kind="kl16", path="unused", latent_channels=4, downsample=8))
    gpt = GPTConfig(size="custom", layers=2, heads=2, dim=32, head_width=32, head_depth=2, num_classes=10,
                    num_tokens=8)
    return [tokenizer_workload("tokenizer-tiny", tok, batch or 8, repa, 4, 16),
            ar_workload("ar-tiny", gpt, batch or 8)]


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the kernel's peak-RSS counter (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare_variant(work: Workload, batch: tuple, frozen: tuple, optimised: bool, device: torch.device, bf16: bool,
                    use_compile: bool, warmup: int, seed: int) -> tuple[Callable[[], torch.Tensor], dict]:
    """Build the model (same seed for every variant), run its first step and warm-up steps; returns the training
    step (timed by bench(), in turns with the other variant's) and the start-up figures."""
    set_fast_paths(optimised)
    _reset_peak_memory(device)
    # On a GPU the other variant's model, already built, is not this one's; a CPU's RSS has no such split.
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(seed)
    task = work.make_task(device, frozen)
    model = task.model.train()
    compiled = compile_blocks(model) if use_compile else 0
    lr, betas, wd = 1e-4, (0.9, 0.95), 0.05
    if optimised:
        optimizer = build_adamw(model, lr, betas, wd)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=betas)
    ema = EMA.of_parameters(model, 0.999)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with autocast:
            loss, _ = task.loss(model, batch, 0, NESTING_EPOCH)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, work.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        return loss

    # The first step compiles (optimised) and allocates the optimizer state: timed apart, as the start-up cost.
    # Same seed for both variants: the same timesteps, noise and nested-dropout prefixes, so comparable losses.
    torch.manual_seed(seed + 1)
    sync(device)
    start = time.perf_counter()
    first_loss = step().float().item()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync(device)
    return step, {"compiled_blocks": compiled, "first_step_s": first, "first_step_loss": first_loss,
                  "peak_memory_bytes": _peak_memory(device) - resident}


def _release(device: torch.device) -> None:
    """Free the last variant's model, optimizer state and EMA before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench(work: Workload, device: torch.device, args) -> dict:
    gen = torch.Generator(device).manual_seed(args.seed)
    batch, frozen = work.make_inputs(device, work.batch, gen)
    gpu = device.type == "cuda"
    peak = peak_tflops(device, args.peak_tflops)
    variants, steps = {}, {}
    for name, optimised in (("plain", False), ("optimised", True)):
        bf16 = gpu and (optimised or not args.plain_fp32)
        use_compile = optimised and not args.no_compile
        steps[name], variants[name] = prepare_variant(work, batch, frozen, optimised, device, bf16, use_compile,
                                                      args.warmup, args.seed)
    # The two take turns, a step each (plain, optimised; optimised, plain; ...), the fast-path switch set before
    # each step, so a shared machine's load falls on both alike.
    times = interleaved(steps, device, rounds=args.steps, warmup=0,
                        before={"plain": lambda: set_fast_paths(False), "optimised": lambda: set_fast_paths(True)})
    set_fast_paths(True)
    for name, t in times.items():
        seconds = median(t)
        variants[name].update(step_s=seconds, all_step_s=t, images_per_s=work.batch / seconds,
                              tflops=work.trained_flops * work.batch / seconds / 1e12)
    stats = ratio_stats(times["plain"], times["optimised"])
    del steps
    _release(device)
    for v in variants.values():
        v["mfu"] = v["tflops"] / peak if peak else None
    plain, opt = variants["plain"], variants["optimised"]
    return {
        "workload": work.name, "batch": work.batch,
        "flops_per_image": work.flops, "trained_flops_per_image": work.trained_flops,
        "peak_bf16_tflops": peak,
        **variants,
        "speedup": stats["median"],
        "speedup_stats": stats,
        "memory_ratio": opt["peak_memory_bytes"] / plain["peak_memory_bytes"],
        "loss_rel_diff": abs(opt["first_step_loss"] - plain["first_step_loss"])
        / max(abs(plain["first_step_loss"]), 1e-12),
    }


def _print(row: dict) -> None:
    print(f"{row['workload']} (batch {row['batch']}, {row['trained_flops_per_image'] / 1e9:.2f} GFLOP/image trained)")
    print(f"  {'variant':10s} {'step ms':>10s} {'img/s':>10s} {'TFLOP/s':>9s} {'MFU':>6s} {'peak MiB':>10s} "
          f"{'1st step s':>10s} {'loss':>10s}")
    for name in ("plain", "optimised"):
        v = row[name]
        mfu = f"{100 * v['mfu']:5.1f}%" if v["mfu"] is not None else "   n/a"
        print(f"  {name:10s} {1e3 * v['step_s']:10.2f} {v['images_per_s']:10.1f} {v['tflops']:9.3f} {mfu} "
              f"{v['peak_memory_bytes'] / 2 ** 20:10.0f} {v['first_step_s']:10.2f} {v['first_step_loss']:10.5f}")
    print(f"  optimised / plain: {format_ratio(row['speedup_stats'])} images/s, x{row['memory_ratio']:.2f} peak "
          f"memory, first-step loss rel. diff {row['loss_rel_diff']:.1e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tokenizer-L", "ar-L", "tiny"], default="tiny")
    p.add_argument("--batch", type=int, default=None,
                   help="per-device batch (default: 64 tokenizer-L, 256 ar-L, 8 tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU / 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 3 GPU / 1 CPU)")
    p.add_argument("--no-compile", action="store_true", help="optimised without torch.compile")
    p.add_argument("--no-repa", action="store_true", help="tokenizer without the REPA projector and target")
    p.add_argument("--same-draws", action="store_true",
                   help="compile with inductor's fallback_random: dropout inside compiled blocks draws as eager "
                        "does, so the first-step losses agree (slower kernels than training runs)")
    p.add_argument("--plain-fp32", action="store_true", help="plain variant in fp32 instead of bf16 autocast (GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: toy shapes on a shared machine only lose to more)")
    p.add_argument("--seed", type=int, default=0)
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if not gpu:
        torch.set_num_threads(args.threads)

    was_fast = fast_paths_enabled()
    try:
        with torch._inductor.config.patch(fallback_random=args.same_draws):
            rows = []
            for work in presets(args.preset, args.batch, not args.no_repa):
                rows.append(bench(work, device, args))
                _print(rows[-1])
    finally:
        set_fast_paths(was_fast)
    record = {
        "device": describe_device(device), "device_kind": device.type, "preset": args.preset,
        "compile": not args.no_compile, "same_draws": args.same_draws, "repa": not args.no_repa,
        "precision": {"optimised": "bf16" if gpu else "fp32",
                      "plain": "bf16" if gpu and not args.plain_fp32 else "fp32"},
        "steps": args.steps, "warmup": args.warmup, "results": rows,
    }
    if not args.no_write:
        print("wrote", write_result("bench_train", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
