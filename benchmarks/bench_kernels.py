"""Each fast kernel against its eager PyTorch reference, forward and forward+backward, side by side.

    python benchmarks/bench_kernels.py                      # GPU: model-sized shapes, bf16
    python benchmarks/bench_kernels.py --compiled-reference # also time torch.compile(reference)

On a GPU it times the Triton kernels, the C++/CUDA ops and the split slot-encoder attention; on a CPU it is a
smoke run with small shapes (C++ ops and the attention split only: interpreted Triton timings mean nothing).
GB/s counts the ideal traffic: forward reads every input and writes every output once; forward+backward adds
reading the output gradients and the inputs again and writing the input gradients.
The baseline is the plain PyTorch reference each fast path replaces (kernels/reference.py: what the model runs
without the fast paths, i.e. what a user of the reference design runs); --compiled-reference adds torch.compile of
it, the other thing a user would try. Implementations take turns (benchmarks/common.py:interleaved); the speed-up is
the median of the per-round ratios, with its IQR and range.
Appends its figures to the results store (benchmarks/results/history.jsonl) with the device, date and git commit;
refuses a dirty tree unless --allow-dirty.
"""
import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import (add_record_arguments, check_clean, describe_device, interleaved,  # noqa: E402
                               ratio_stats, write_result)
from semanticist_fast.kernels import dispatch, extension, reference  # noqa: E402


@dataclass
class Case:
    name: str
    impl: str  # what the fast side is: triton / c++ / split-attention
    shape: str
    make_inputs: Callable[[], list[torch.Tensor]]
    fast: Callable[..., object]
    ref: Callable[..., object]


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _repeated(fn: Callable[[], object], inner: int) -> Callable[[], None]:
    """fn called `inner` times per timed call: a kernel of microseconds is timed over several launches, so the
    synchronisation around each timed call does not dominate."""
    def calls():
        for _ in range(inner):
            fn()
    return calls


def _fwd_bwd(fn, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    diff = [t for t in inputs if t.requires_grad]

    def step():
        outs = _outputs(fn(*inputs))
        torch.autograd.grad(outs, diff, grads)

    return step


def run_case(case: Case, device: torch.device, warmup: int, rounds: int, inner: int, compiled_ref: bool) -> list[dict]:
    inputs = case.make_inputs()
    with torch.no_grad():
        outs = _outputs(case.ref(*inputs))
    grads = [torch.randn_like(o) for o in outs]
    diff_inputs = [t for t in inputs if t.requires_grad]
    fwd_bytes = _nbytes(inputs) + _nbytes(outs)
    bwd_bytes = fwd_bytes + _nbytes(grads) + _nbytes(inputs) + _nbytes(diff_inputs)
    impls = {"reference": case.ref, case.impl: case.fast}
    if compiled_ref:
        impls["compiled reference"] = torch.compile(case.ref)
    rows = []
    for mode, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", bwd_bytes)):
        steps = {}
        for label, fn in impls.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn(*inputs)
            else:
                step = _fwd_bwd(fn, inputs, grads)
            steps[label] = _repeated(step, inner)
        times = interleaved(steps, device, rounds=rounds, warmup=warmup)
        for label, t in times.items():
            ms = statistics.median(t) / inner * 1e3
            stats = ratio_stats(times["reference"], t)
            rows.append({"kernel": case.name, "impl": label, "shape": case.shape, "mode": mode, "ms": round(ms, 5),
                         "speedup_vs_reference": round(stats["median"], 3),
                         "speedup_iqr": [round(stats["q1"], 3), round(stats["q3"], 3)],
                         "speedup_range": [round(stats["min"], 3), round(stats["max"], 3)],
                         "gb_per_s": round(nbytes / ms / 1e6, 2)})
    return rows


def _leaf(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype).requires_grad_()


def _triton_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    tk = dispatch._triton_kernels()
    if device.type != "cuda" or tk is None:
        return []
    mk = lambda *s: _leaf(*s, dtype=dtype, device=device)  # noqa: E731
    # DiT-L/2 tokens: 64 patches + 256 slots, hidden 1024; GPT-L: 256 x 33 tokens of 1024, SwiGLU hidden 2816.
    B, N, C = 32, 320, 1024
    rows, H = 256 * 33, 2816
    return [
        Case("layernorm_modulate", "triton", f"{B}x{N}x{C}",
             lambda: [mk(B, N, C), mk(B, C), mk(B, C)],
             lambda x, s, c: tk.adaln.layernorm_modulate(x, s, c, 1e-6),
             lambda x, s, c: reference.layernorm_modulate(x, s, c, 1e-6)),
        Case("gated_residual", "triton", f"{B}x{N}x{C}",
             lambda: [mk(B, N, C), mk(B, C), mk(B, N, C)],
             tk.adaln.gated_residual, reference.gated_residual),
        Case("gated_residual_layernorm_modulate", "triton", f"{B}x{N}x{C}",
             lambda: [mk(B, N, C), mk(B, C), mk(B, N, C), mk(B, C), mk(B, C)],
             lambda *a: tk.adaln.gated_residual_layernorm_modulate(*a, eps=1e-6),
             lambda *a: reference.gated_residual_layernorm_modulate(*a, eps=1e-6)),
        Case("rms_norm", "triton", f"{rows}x{C}",
             lambda: [mk(rows, C), _leaf(C, dtype=torch.float32, device=device)],
             lambda x, w: tk.rmsnorm.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5)),
        Case("swiglu", "triton", f"{rows}x{H}",
             lambda: [mk(rows, H), mk(rows, H)], tk.swiglu.swiglu, reference.swiglu),
    ]


def _extension_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    if not extension.supports(torch.empty(0, device=device)):
        return []
    mk = lambda *s: _leaf(*s, dtype=dtype, device=device)  # noqa: E731
    B, K, D = (256, 256, 16) if device.type == "cuda" else (16, 256, 16)
    keep = torch.randint(1, K + 1, (B,), device=device)
    return [
        Case("nested_dropout", "c++", f"{B}x{K}x{D}",
             lambda: [mk(B, K, D), _leaf(1, K, D, dtype=torch.float32, device=device)],
             lambda t, n: extension.nested_dropout(t, n, keep), lambda t, n: reference.nested_dropout(t, n, keep)),
        Case("standardize_tokens", "c++", f"{B * K}x{D}",
             lambda: [mk(B * K, D)], lambda x: extension.standardize(x, 1e-6),
             lambda x: reference.standardize_tokens(x, 1e-6)),
    ]


def _attention_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    # Slot encoder, ViT-B: 257 image tokens + 256 slots, 12 heads of 64.
    B, H, n_img, n_slot, Dh = (32, 12, 257, 256, 64) if device.type == "cuda" else (2, 4, 65, 32, 32)
    mask = dispatch.encoder_attention_mask(n_img, n_slot, device)
    return [Case("slot_encoder_attention", "split-attention", f"{B}x{H}x{n_img + n_slot}x{Dh}",
                 lambda: [_leaf(B, H, n_img + n_slot, Dh, dtype=dtype, device=device) for _ in range(3)],
                 lambda q, k, v: dispatch.slot_encoder_attention(q, k, v, n_img),
                 lambda q, k, v: reference.attention(q, k, v, attn_mask=mask))]


def build_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    return _triton_cases(device, dtype) + _extension_cases(device, dtype) + _attention_cases(device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed rounds, each calling every implementation in turn (default 30 GPU / 10 CPU)")
    parser.add_argument("--inner", type=int, default=None,
                        help="calls per timed call (default 10 GPU / 1 CPU): microsecond kernels timed over several")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3 GPU / 2 CPU)")
    parser.add_argument("--compiled-reference", action="store_true", help="also time torch.compile(reference)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: stable smoke timings on a shared machine)")
    add_record_arguments(parser)
    args = parser.parse_args()
    check_clean(args.allow_dirty, args.no_write)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if gpu else torch.float32}[args.dtype]
    iters = args.iters or (30 if gpu else 10)
    inner = args.inner or (10 if gpu else 1)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    if not gpu:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dispatch.set_fast_paths(True)

    rows = []
    for case in build_cases(device, dtype):
        rows += run_case(case, device, warmup, iters, inner, args.compiled_reference)

    print(f"{'kernel':36s} {'mode':8s} {'impl':20s} {'ms':>10s} {'x ref':>7s} {'IQR':>13s} {'GB/s':>9s}")
    for r in rows:
        iqr = "x{:.2f}-{:.2f}".format(*r["speedup_iqr"])
        print(f"{r['kernel']:36s} {r['mode']:8s} {r['impl']:20s} {r['ms']:10.4f} {r['speedup_vs_reference']:7.2f} "
              f"{iqr:>13s} {r['gb_per_s']:9.1f}")

    record = {
        "device": describe_device(device),
        "device_kind": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": iters,
        "inner": inner,
        "compiled_reference": args.compiled_reference,
        "extension": extension.STATUS,
        "results": rows,
    }
    if not args.no_write:
        print("wrote", write_result("bench_kernels", record, allow_dirty=args.allow_dirty))


if __name__ == "__main__":
    main()
