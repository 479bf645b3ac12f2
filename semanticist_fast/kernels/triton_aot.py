"""Compile every Triton kernel of the package for a GPU target, on a machine without a GPU.

The CPU interpreter checks the kernels' numerics but not that they lower: this runs the real compiler
(Triton IR -> PTX -> cubin with ptxas) for each kernel, storage dtype and constexpr variant.

    python -m semanticist_fast.kernels.triton_aot            # sm_90 (H100 / H200)
    python -m semanticist_fast.kernels.triton_aot --arch 80

Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""
import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_adaln, triton_rmsnorm, triton_swiglu


def _ptr(dtype: str) -> str:
    return "*" + dtype


def kernel_specs(dtype: str) -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """(kernel, signature, constexprs) covering every variant the Python wrappers launch, for one storage dtype."""
    p, f32 = _ptr(dtype), "*fp32"
    adaln_fwd = {**{n: p for n in ("X", "GATE", "Y", "SHIFT", "SCALE", "H", "OUT")}, "MEAN": f32, "RSTD": f32,
                 "N": "i32", "C": "i32", "eps": "fp32"}
    adaln_bwd = {**{n: p for n in ("G_OUT", "G_H", "H", "GATE", "Y", "SCALE")}, "MEAN": f32, "RSTD": f32,
                 "DX": p, "DY": p, "DGATE_P": f32, "DSHIFT_P": f32, "DSCALE_P": f32,
                 "N": "i32", "C": "i32", "rows_per_prog": "i32"}
    specs = []
    for residual, norm in ((True, True), (False, True), (True, False)):
        flags = {"HAS_RESIDUAL": residual, "HAS_NORM": norm, "BLOCK_C": 1024}
        specs.append((triton_adaln._adaln_fwd_kernel, adaln_fwd, flags))
        specs.append((triton_adaln._adaln_bwd_kernel, adaln_bwd, flags))
    specs += [
        (triton_rmsnorm._rms_fwd_kernel, {"X": p, "W": f32, "OUT": p, "RSTD": f32, "C": "i32", "eps": "fp32"},
         {"BLOCK_C": 2048}),
        (triton_rmsnorm._rms_bwd_kernel, {"G": p, "X": p, "W": f32, "RSTD": f32, "DX": p, "DW_P": f32, "M": "i32",
                                          "C": "i32", "rows_per_prog": "i32"}, {"BLOCK_C": 2048}),
        (triton_swiglu._swiglu_fwd_kernel, {"A": p, "B": p, "OUT": p, "numel": "i32"}, {"BLOCK": 1024}),
        (triton_swiglu._swiglu_bwd_kernel, {"G": p, "A": p, "B": p, "DA": p, "DB": p, "numel": "i32"},
         {"BLOCK": 1024}),
    ]
    return specs


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp32")) -> list[str]:
    """Compiles every kernel variant; returns one line per compiled variant. Raises on the first failure."""
    target = GPUTarget("cuda", arch, 32)
    done = []
    for dtype in dtypes:
        for kernel, signature, constexprs in kernel_specs(dtype):
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
            assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"
            done.append(f"{kernel.__name__} {dtype} {constexprs}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = sm_90)")
    args = parser.parse_args()
    for line in compile_all(args.arch):
        print("ok", line)


if __name__ == "__main__":
    main()
