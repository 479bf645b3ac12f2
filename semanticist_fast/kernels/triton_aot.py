"""Compile every Triton kernel launch the Python wrappers make, for a GPU target, on a machine without a GPU.

The CPU interpreter checks the kernels' numerics but not that they lower. This runs the real compiler (Triton IR ->
PTX -> cubin with ptxas) on what the wrappers would launch: each wrapper (triton_adaln, triton_rmsnorm,
triton_swiglu) is called forward and backward on small CPU tensors of each published model width, with the kernels
swapped for recorders, so the block sizes, warps, constexpr flags and pointer dtypes are the wrappers' own choices
(row_launch, elementwise_launch, the output dtype rules), and Triton's own argument binder turns each recorded call
into the signature, constants and specialisation attributes (16-byte alignment, divisibility by 16) that its JIT
would compile on the GPU. The launches are deduplicated, then compiled.

Operand dtypes: every pair (residual stream, linear outputs) of bf16, fp16 and fp32, which holds the uniform
cases and the mixed pointers of autocast (the DiT's fp32 residual stream with bf16 / fp16 conditioning and branch
outputs; the GPT's fp32 stream into RMSNorm; bf16 activations with fp32 parameters); tests/test_kernels.py checks
that the tiny models hand the wrappers nothing outside this list under autocast.

    python -m semanticist_fast.kernels.triton_aot                 # sm_90 (H100 / H200), the published widths
    python -m semanticist_fast.kernels.triton_aot --arch 80 --widths 1152 --list

Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""
import argparse
import contextlib
import itertools
from dataclasses import dataclass
from types import ModuleType

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import triton_adaln, triton_rmsnorm, triton_swiglu

# Rows the row kernels hold: the DiT-B/L/XL hidden widths (768, 1024, 1152) and the GPT-B/L/XL dims (768, 1024,
# 1280); tests/test_kernels.py checks this against models/dit.py DIT_SIZES and models/gpt.py GPT_SIZES.
PUBLISHED_WIDTHS = (768, 1024, 1152, 1280)
STORAGE = (torch.bfloat16, torch.float16, torch.float32)
WRAPPER_MODULES: tuple[ModuleType, ...] = (triton_adaln, triton_rmsnorm, triton_swiglu)
TOKENS = 256  # rows per sample in the recorded calls: a DiT/2 on the 16 x 16 latents of a 256 px image


@dataclass(frozen=True)
class Launch:
    """One compiled variant of a kernel: what Triton's JIT keys its cache on."""
    kernel: JITFunction
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    attrs: tuple  # ((argument path, ((attribute, value), ...)), ...): alignment / divisibility specialisations
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        pointers = ",".join(t.removeprefix("*") for _, t in self.signature if t.startswith("*"))
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel.__name__} [{pointers}] {consts} warps={self.num_warps}"


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) binds the call as the JIT would, records
    it, and launches nothing."""

    def __init__(self, kernel: JITFunction, backend, out: list):
        self.kernel, self.backend, self.out = kernel, backend, out
        self.binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        bound, specialization, options = self.binder(*args, **kwargs)
        options, signature, constexprs, attrs = self.kernel._pack_args(self.backend, kwargs, bound, specialization,
                                                                       options)
        names = self.kernel.arg_names
        self.out.append(Launch(
            self.kernel, tuple((k, v) for k, v in signature.items() if v != "constexpr"),
            tuple((names[path[0]], value) for path, value in sorted(constexprs.items())),
            tuple((path, tuple(map(tuple, value))) for path, value in sorted(attrs.items())),
            options.num_warps, options.num_stages))


@contextlib.contextmanager
def _recording(backend, out: list):
    """Every *_kernel of the wrapper modules replaced by a recorder, for the duration."""
    swapped = []
    for module in WRAPPER_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                swapped.append((module, name, value))
    try:
        for module, name, kernel in swapped:
            setattr(module, name, _Recorder(kernel, backend, out))
        yield
    finally:
        for module, name, kernel in swapped:
            setattr(module, name, kernel)


def _backward(outputs, inputs) -> None:
    """Runs the backward of outputs (a tensor or a tuple of them) into inputs: the backward kernels' launches."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.grad(sum(o.float().sum() for o in outputs), inputs)


def _call_wrappers(width: int, stream: torch.dtype, linear: torch.dtype) -> None:
    """Each wrapper forward and backward: residual stream x in `stream`; branch outputs, conditioning and
    weights (what linears and parameters give) in `linear`."""
    B = 2

    def t(*shape, dtype):
        return torch.zeros(*shape, dtype=dtype).requires_grad_()

    x, y = t(B, TOKENS, width, dtype=stream), t(B, TOKENS, width, dtype=linear)
    gate, shift, scale = (t(B, width, dtype=linear) for _ in range(3))
    _backward(triton_adaln.layernorm_modulate(x, shift, scale), (x, shift, scale))
    _backward(triton_adaln.gated_residual(x, gate, y), (x, gate, y))
    _backward(triton_adaln.gated_residual_layernorm_modulate(x, gate, y, shift, scale), (x, gate, y, shift, scale))
    weight = t(width, dtype=linear)
    _backward(triton_rmsnorm.rms_norm(x, weight), (x, weight))
    a = t(B, TOKENS, width, dtype=stream)
    _backward(triton_swiglu.swiglu(a, y), (a, y))


def wrapper_launches(widths=PUBLISHED_WIDTHS, dtypes=STORAGE, arch: int = 90) -> list[Launch]:
    """The distinct kernel launches the wrappers make for these widths and every (stream, linear) dtype pair."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    recorded: list[Launch] = []
    with _recording(backend, recorded):
        for width, stream, linear in itertools.product(widths, dtypes, dtypes):
            _call_wrappers(width, stream, linear)
    return list(dict.fromkeys(recorded))


def compile_all(arch: int = 90, widths=PUBLISHED_WIDTHS, dtypes=STORAGE) -> list[str]:
    """Compiles every distinct launch to a cubin; returns one line per launch. Raises on the first failure."""
    target = GPUTarget("cuda", arch, 32)
    done = []
    for launch in wrapper_launches(widths, dtypes, arch):
        kernel = launch.kernel
        signature = {**dict(launch.signature), **{name: "constexpr" for name, _ in launch.constexprs}}
        attrs = {path: [list(a) for a in value] for path, value in launch.attrs}
        source = ASTSource(fn=kernel, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
        compiled = triton.compile(source, target=target,
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"
        done.append(launch.describe())
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = sm_90)")
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")), default=PUBLISHED_WIDTHS,
                        help="comma-separated row widths (default: the published model widths)")
    parser.add_argument("--list", action="store_true", help="list the launches, compile nothing")
    args = parser.parse_args(argv)
    if args.list:
        for launch in wrapper_launches(args.widths, arch=args.arch):
            print(launch.describe())
        return
    for line in compile_all(args.arch, args.widths):
        print("ok", line)


if __name__ == "__main__":
    main()
