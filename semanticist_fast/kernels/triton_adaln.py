"""Triton kernels for the adaLN pieces of a DiT block: LayerNorm+modulate, gated residual, and both fused.

x, y: (B, N, C); gate, shift, scale: (B, C), one row of conditioning per sample. One forward program per
token row, fp32 math whatever the storage dtype. Backward programs own a chunk of rows of one sample so
that the per-sample sums (dshift, dscale, dgate) are formed in registers; see rows_per_program.

The fused op exists because a DiT block does `x = x + gate * attn(...)` and immediately
`modulate(norm(x), shift, scale)`: fused, the new residual stream is read from memory once, not three times.

Each op is a torch.library.custom_op with a fake and an autograd formula, so torch.compile keeps it as one
opaque node in a single graph (no graph break).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import add, on_device, row_launch, rows_per_program


@triton.jit
def _adaln_fwd_kernel(
    X, GATE, Y, SHIFT, SCALE, H, OUT, MEAN, RSTD,
    N, C, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * C + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + gate * y).to(H.dtype.element_ty)
        tl.store(H + row * C + cols, h, mask=mask)
        # Normalise the stored (rounded) stream, exactly what an unfused next block would read.
        x = h.to(tl.float32)
    if HAS_NORM:
        mean = tl.reduce(x, 0, add) / C
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.reduce(xc * xc, 0, add) / C + eps)
        shift = tl.load(SHIFT + b * C + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * C + cols, mask=mask, other=0.0).to(tl.float32)
        out = xc * rstd * (1.0 + scale) + shift
        tl.store(OUT + row * C + cols, out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def _adaln_bwd_kernel(
    G_OUT, G_H, H, GATE, Y, SCALE, MEAN, RSTD,
    DX, DY, DGATE_P, DSHIFT_P, DSCALE_P,
    N, C, rows_per_prog,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    dshift = tl.full([BLOCK_C], 0.0, tl.float32)
    dscale = tl.full([BLOCK_C], 0.0, tl.float32)
    dgate = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_NORM:
        one_plus_scale = 1.0 + tl.load(SCALE + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    n_start = chunk * rows_per_prog
    n_end = tl.minimum(n_start + rows_per_prog, N)
    for n in range(n_start, n_end):
        row = b * N + n
        dh = tl.full([BLOCK_C], 0.0, tl.float32)
        if HAS_NORM:
            g = tl.load(G_OUT + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            hhat = tl.where(mask, (h - mean) * rstd, 0.0)
            dshift += g
            dscale += g * hhat
            dhhat = g * one_plus_scale
            dh = rstd * (dhhat - tl.reduce(dhhat, 0, add) / C - hhat * (tl.reduce(dhhat * hhat, 0, add) / C))
        if HAS_RESIDUAL:
            dh += tl.load(G_H + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            dgate += dh * y
            tl.store(DY + row * C + cols, (dh * gate).to(DY.dtype.element_ty), mask=mask)
        tl.store(DX + row * C + cols, dh.to(DX.dtype.element_ty), mask=mask)
    partial = (b * n_chunks + chunk) * C + cols
    if HAS_NORM:
        tl.store(DSHIFT_P + partial, dshift, mask=mask)
        tl.store(DSCALE_P + partial, dscale, mask=mask)
    if HAS_RESIDUAL:
        tl.store(DGATE_P + partial, dgate, mask=mask)


def _launch_fwd(x: Tensor, gate: Tensor | None, y: Tensor | None, shift: Tensor | None, scale: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (h, out, mean, rstd); h = x when there is no residual, out/mean/rstd are empty without a norm."""
    B, N, C = x.shape
    has_res, has_norm = gate is not None, shift is not None
    h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)),
                    device=x.device) if has_res else x
    out = torch.empty_like(h) if has_norm else h
    mean = torch.empty(B * N if has_norm else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block, warps = row_launch(C)
    with on_device(x):
        _adaln_fwd_kernel[(B * N,)](
            x, gate if has_res else x, y if has_res else x, shift if has_norm else x, scale if has_norm else x,
            h, out, mean if has_norm else x, rstd if has_norm else x, N, C, eps,
            HAS_RESIDUAL=has_res, HAS_NORM=has_norm, BLOCK_C=block, num_warps=warps,
        )
    return h, out, mean, rstd


def _launch_bwd(g_out: Tensor | None, g_h: Tensor | None, h: Tensor, x_dtype: torch.dtype, gate: Tensor | None,
                y: Tensor | None, scale: Tensor | None, mean: Tensor, rstd: Tensor) -> tuple[Tensor, ...]:
    """Returns (dx, dy, dgate_fp32, dshift_fp32, dscale_fp32); absent pieces are empty tensors."""
    B, N, C = h.shape
    has_res, has_norm = gate is not None, scale is not None
    rows = rows_per_program(N, B, h.device)
    n_chunks = -(-N // rows)
    empty = h.new_empty(0)
    dx = torch.empty(h.shape, dtype=x_dtype, device=h.device)
    dy = torch.empty_like(y) if has_res else empty
    partials = [torch.empty(B, n_chunks, C, dtype=torch.float32, device=h.device) if on else empty
                for on in (has_res, has_norm, has_norm)]
    block, warps = row_launch(C)
    with on_device(h):
        _adaln_bwd_kernel[(B, n_chunks)](
            g_out if has_norm else h, g_h if has_res else h, h, gate if has_res else h, y if has_res else h,
            scale if has_norm else h, mean if has_norm else h, rstd if has_norm else h,
            dx, dy if has_res else dx, *(p if p.numel() else dx for p in partials), N, C, rows,
            HAS_RESIDUAL=has_res, HAS_NORM=has_norm, BLOCK_C=block, num_warps=warps,
        )
    dgate, dshift, dscale = (p.sum(1) if p.numel() else p for p in partials)
    return dx, dy, dgate, dshift, dscale


# ---- LayerNorm (no affine) + modulate ----

@torch.library.custom_op("semanticist_triton::layernorm_modulate", mutates_args=())
def _ln_mod(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _, out, mean, rstd = _launch_fwd(x, None, None, shift, scale, eps)
    return out, mean, rstd


@_ln_mod.register_fake
def _(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("semanticist_triton::layernorm_modulate_backward", mutates_args=())
def _ln_mod_bwd(g: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, _, _, dshift, dscale = _launch_bwd(g, None, x, x.dtype, None, None, scale, mean, rstd)
    return dx, dshift, dscale


@_ln_mod_bwd.register_fake
def _(g, x, scale, mean, rstd):
    return torch.empty_like(x), scale.new_empty(scale.shape, dtype=torch.float32), \
        scale.new_empty(scale.shape, dtype=torch.float32)


def _ln_mod_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.dtypes = (shift.dtype, scale.dtype)


def _ln_mod_backward(ctx, g, _g_mean, _g_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _ln_mod_bwd(g.contiguous(), x, scale, mean, rstd)
    return dx, dshift.to(ctx.dtypes[0]), dscale.to(ctx.dtypes[1]), None


_ln_mod.register_autograd(_ln_mod_backward, setup_context=_ln_mod_setup)


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    return _ln_mod(x.contiguous(), shift.contiguous(), scale.contiguous(), float(eps))[0]


# ---- gated residual ----

@torch.library.custom_op("semanticist_triton::gated_residual", mutates_args=())
def _gres(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return _launch_fwd(x, gate, y, None, None, 0.0)[0]


@_gres.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)))


@torch.library.custom_op("semanticist_triton::gated_residual_backward", mutates_args=())
def _gres_bwd(g: Tensor, x_dtype: torch.dtype, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dy, dgate, _, _ = _launch_bwd(None, g, g, x_dtype, gate, y, None, g.new_empty(0), g.new_empty(0))
    return dx, dgate, dy


@_gres_bwd.register_fake
def _(g, x_dtype, gate, y):
    return g.new_empty(g.shape, dtype=x_dtype), gate.new_empty(gate.shape, dtype=torch.float32), torch.empty_like(y)


def _gres_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gres_backward(ctx, g):
    gate, y = ctx.saved_tensors
    dx, dgate, dy = _gres_bwd(g.contiguous(), ctx.x_dtype, gate, y)
    return dx, dgate.to(gate.dtype), dy


_gres.register_autograd(_gres_backward, setup_context=_gres_setup)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return _gres(x.contiguous(), gate.contiguous(), y.contiguous())


# ---- gated residual fused with the next LayerNorm + modulate ----

@torch.library.custom_op("semanticist_triton::gated_residual_layernorm_modulate", mutates_args=())
def _gres_ln_mod(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
                 eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_fwd(x, gate, y, shift, scale, eps)


@_gres_ln_mod.register_fake
def _(x, gate, y, shift, scale, eps):
    h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)))
    rows = x.shape[0] * x.shape[1]
    return h, torch.empty_like(h), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("semanticist_triton::gated_residual_layernorm_modulate_backward", mutates_args=())
def _gres_ln_mod_bwd(g_h: Tensor, g_out: Tensor, h: Tensor, x_dtype: torch.dtype, gate: Tensor, y: Tensor,
                     scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dy, dgate, dshift, dscale = _launch_bwd(g_out, g_h, h, x_dtype, gate, y, scale, mean, rstd)
    return dx, dgate, dy, dshift, dscale


@_gres_ln_mod_bwd.register_fake
def _(g_h, g_out, h, x_dtype, gate, y, scale, mean, rstd):
    f32 = torch.float32
    return (h.new_empty(h.shape, dtype=x_dtype), gate.new_empty(gate.shape, dtype=f32), torch.empty_like(y),
            scale.new_empty(scale.shape, dtype=f32), scale.new_empty(scale.shape, dtype=f32))


def _gres_ln_mod_setup(ctx, inputs, output):
    x, gate, y, shift, scale, _ = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, gate, y, scale, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.shift_dtype = shift.dtype


def _gres_ln_mod_backward(ctx, g_h, g_out, _g_mean, _g_rstd):
    h, gate, y, scale, mean, rstd = ctx.saved_tensors
    g_h = torch.zeros_like(h) if g_h is None else g_h.contiguous()
    g_out = torch.zeros_like(h) if g_out is None else g_out.contiguous()
    dx, dgate, dy, dshift, dscale = _gres_ln_mod_bwd(g_h, g_out, h, ctx.x_dtype, gate, y, scale, mean, rstd)
    return dx, dgate.to(gate.dtype), dy, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_gres_ln_mod.register_autograd(_gres_ln_mod_backward, setup_context=_gres_ln_mod_setup)


def gated_residual_layernorm_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
                                      eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    h, out, _, _ = _gres_ln_mod(x.contiguous(), gate.contiguous(), y.contiguous(), shift.contiguous(),
                                scale.contiguous(), float(eps))
    return h, out
