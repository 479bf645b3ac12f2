"""Triton RMSNorm with a weight (the GPT's pre-norm): y = x / sqrt(mean(x^2) + eps) * w over the last dim.

One forward program per row, fp32 math. The backward gives each program a chunk of rows and writes one fp32
partial of dweight per program, which torch sums (see rows_per_program).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import add, on_device, row_launch, rows_per_program


@triton.jit
def _rms_fwd_kernel(X, W, OUT, RSTD, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 0, add) / C + eps)
    tl.store(OUT + row * C + cols, (x * rstd * w).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(G, X, W, RSTD, DX, DW_P, M, C, rows_per_prog, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.full([BLOCK_C], 0.0, tl.float32)
    start = chunk.to(tl.int64) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for row in range(start, end):
        g = tl.load(G + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        dw += g * xhat
        gw = g * w
        dx = rstd * (gw - xhat * (tl.reduce(gw * xhat, 0, add) / C))
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_P + chunk * C + cols, dw, mask=mask)


@torch.library.custom_op("semanticist_triton::rms_norm", mutates_args=())
def _rms(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    C = x.shape[-1]
    M = x.numel() // C
    out = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block, warps = row_launch(C)
    with on_device(x):
        _rms_fwd_kernel[(M,)](x, weight, out, rstd, C, eps, BLOCK_C=block, num_warps=warps)
    return out, rstd


@_rms.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("semanticist_triton::rms_norm_backward", mutates_args=())
def _rms_bwd(g: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    C = x.shape[-1]
    M = x.numel() // C
    rows = rows_per_program(M, 1, x.device)
    n_chunks = -(-M // rows)
    dx = torch.empty_like(x)
    dw_partial = torch.empty(n_chunks, C, dtype=torch.float32, device=x.device)
    block, warps = row_launch(C)
    with on_device(x):
        _rms_bwd_kernel[(n_chunks,)](g, x, weight, rstd, dx, dw_partial, M, C, rows,
                                     BLOCK_C=block, num_warps=warps)
    return dx, dw_partial.sum(0)


@_rms_bwd.register_fake
def _(g, x, weight, rstd):
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32)


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, g, _g_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_bwd(g.contiguous(), x, weight, rstd)
    return dx, dw.to(weight.dtype), None


_rms.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    return _rms(x.contiguous(), weight.contiguous(), float(eps))[0]
