"""Triton SwiGLU gate silu(a) * b, forward and backward, elementwise over flat storage, fp32 math."""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import on_device



def elementwise_launch(numel: int) -> tuple[int, int, int]:
    """(programs, BLOCK, num_warps) of the elementwise kernels: 1024 elements, 4 warps (8 per thread) a program.

    The wrappers call it, and so does the compile check (triton_aot.py).
    """
    block = 1024
    return triton.cdiv(numel, block), block, 4


@triton.jit
def _swiglu_fwd_kernel(A, B, OUT, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    out = a / (1.0 + tl.exp(-a)) * b
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, A, B, DA, DB, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    silu = a * sig
    da = g * b * (sig + silu * (1.0 - sig))
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (g * silu).to(DB.dtype.element_ty), mask=mask)


@torch.library.custom_op("semanticist_triton::swiglu", mutates_args=())
def _swiglu(a: Tensor, b: Tensor) -> Tensor:
    out = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    n = a.numel()
    programs, block, warps = elementwise_launch(n)
    with on_device(a):
        _swiglu_fwd_kernel[(programs,)](a, b, out, n, BLOCK=block, num_warps=warps)
    return out


@_swiglu.register_fake
def _(a, b):
    return a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


@torch.library.custom_op("semanticist_triton::swiglu_backward", mutates_args=())
def _swiglu_bwd(g: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    programs, block, warps = elementwise_launch(n)
    with on_device(a):
        _swiglu_bwd_kernel[(programs,)](g, a, b, da, db, n, BLOCK=block, num_warps=warps)
    return da, db


@_swiglu_bwd.register_fake
def _(g, a, b):
    return torch.empty_like(a), torch.empty_like(b)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, g):
    a, b = ctx.saved_tensors
    return _swiglu_bwd(g.contiguous(), a, b)


_swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """a and b of one shape (a = w1 x, b = w3 x)."""
    return _swiglu(a.contiguous(), b.contiguous())
