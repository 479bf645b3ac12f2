"""The one place that chooses between a fast path and its plain PyTorch reference.

Models call only the functions in this module. `set_fast_paths(False)` (config `runtime.fast_kernels=false`)
makes every call go to `reference.py`, so the plain path is always one flag away.

Which fast path, when fast paths are on:
- norms / residual / SwiGLU: the Triton kernels for CUDA tensors. CPU tensors use the reference, unless
  `force_triton(True)` or env SEMANTICIST_FORCE_TRITON=1 (tests, with TRITON_INTERPRET=1 set before the
  kernels are imported) sends them to Triton too.
- nested dropout, token standardisation: the C++/CUDA extension `semanticist_fast._C` when it was built
  (its CPU kernels included), else the reference.
- attention: flash-attn (v3, v4 or v2 interface) on CUDA fp16/bf16 without a mask, else torch SDPA; v4 only for
  the head dims it lists and outside a torch.compile trace (v2 takes over where it is installed, else SDPA).
Any input the fast path does not cover (shape, dtype, device) quietly takes the reference.
"""
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension, reference

_FAST = {"enabled": True, "force_triton": os.environ.get("SEMANTICIST_FORCE_TRITON") == "1"}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ROW = 16384  # the norm kernels hold one row in registers


def set_fast_paths(enabled: bool) -> None:
    _FAST["enabled"] = bool(enabled)


def fast_paths_enabled() -> bool:
    return _FAST["enabled"]


def force_triton(enabled: bool) -> None:
    """Send CPU tensors to the Triton kernels as well; only meaningful under the Triton interpreter.

    Enabling imports the kernels now (set TRITON_INTERPRET=1 before that import to interpret them).
    """
    _FAST["force_triton"] = bool(enabled)
    if enabled:
        _load_triton_kernels()


def _load_triton_kernels() -> None:
    if _TRITON["kernels"] is not None:
        return
    try:
        from . import triton_adaln, triton_rmsnorm, triton_swiglu
    except ImportError:
        return
    _TRITON["kernels"] = SimpleNamespace(adaln=triton_adaln, rmsnorm=triton_rmsnorm, swiglu=triton_swiglu)


# Imported here, never inside a traced call: with a GPU up front; without one only when Triton is forced on CPU
# tensors, since the interpreter must be switched on before the kernels are imported.
_TRITON: dict[str, SimpleNamespace | None] = {"kernels": None}
if torch.cuda.is_available() or _FAST["force_triton"]:
    _load_triton_kernels()


def _triton_kernels() -> SimpleNamespace:
    return _TRITON["kernels"]


def _use_triton(*tensors: Tensor) -> bool:
    if not _FAST["enabled"] or tensors[0].numel() == 0:
        return False
    if not all(t.dtype in _FLOATS for t in tensors):
        return False
    on_gpu = all(t.is_cuda for t in tensors)
    on_cpu_forced = _FAST["force_triton"] and all(t.device.type == "cpu" for t in tensors)
    return (on_gpu or on_cpu_forced) and _triton_kernels() is not None


def _per_sample(x: Tensor, *rows: Tensor) -> bool:
    """x is (B, N, C) and every tensor of rows is (B, C): the layout of adaLN conditioning."""
    return x.dim() == 3 and x.shape[2] <= _MAX_ROW and all(r.shape == (x.shape[0], x.shape[2]) for r in rows)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    if _per_sample(x, shift, scale) and _use_triton(x, shift, scale):
        return _triton_kernels().adaln.layernorm_modulate(x, shift, scale, eps)
    return reference.layernorm_modulate(x, shift, scale, eps)


def gated_residual(x, gate, y):
    if _per_sample(x, gate) and x.shape == y.shape and _use_triton(x, gate, y):
        return _triton_kernels().adaln.gated_residual(x, gate, y)
    return reference.gated_residual(x, gate, y)


def gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps: float = 1e-6):
    """(x + gate * y, layernorm_modulate(x + gate * y, shift, scale)) in one pass over the residual stream."""
    if _per_sample(x, gate, shift, scale) and x.shape == y.shape and _use_triton(x, gate, y, shift, scale):
        return _triton_kernels().adaln.gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)
    return reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)


def rms_norm(x, weight, eps: float = 1e-5):
    if weight.shape == (x.shape[-1],) and x.shape[-1] <= _MAX_ROW and _use_triton(x, weight):
        return _triton_kernels().rmsnorm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def swiglu(a, b):
    if a.shape == b.shape and _use_triton(a, b):
        return _triton_kernels().swiglu.swiglu(a, b)
    return reference.swiglu(a, b)


def nested_dropout(tokens, null, keep):
    if (_FAST["enabled"] and extension.supports(tokens) and tokens.dim() == 3 and tokens.dtype in _FLOATS
            and keep.dtype == torch.int64):
        return extension.nested_dropout(tokens, null, keep)
    return reference.nested_dropout(tokens, null, keep)


def standardize_tokens(x, eps: float = 1e-6):
    """Per-token (x - mean) / (unbiased std + eps) over the last dim (the tokenizer's output standardisation)."""
    if _FAST["enabled"] and extension.supports(x) and x.dtype in _FLOATS and x.dim() >= 1 and x.shape[-1] >= 2:
        return extension.standardize(x, eps)
    return reference.standardize_tokens(x, eps)


# ---- attention ----

# The flash-attn interfaces, newest first: module, whether dynamo can trace its flash_attn_func, and the head dims
# it takes (None: any multiple of 8 up to 256). v4 (CuTe DSL) compiles and launches its kernels from Python
# (cute.compile, dlpack) through no registered op, so dynamo cannot trace it inside the regional fullgraph=True
# compile, and its interface lists head dims 64, 96 and 128 only (flash_attn/cute/interface.py; DiT-XL's 72 is not
# among them). v3 and v2 (2.7+) go through registered torch ops.
_FLASH_INTERFACES = (("flash_attn_interface", True, None),      # v3 (Hopper)
                     ("flash_attn.cute", False, (64, 96, 128)),  # v4 (CuTe DSL)
                     ("flash_attn", True, None))                 # v2


def _import_flash_attn() -> dict:
    """The dispatch's flash state: `func`, the newest installed interface's flash_attn_func (q, k, v as
    (B, N, H, Dh)) or None; `fallback`, the next one that has none of its limits, for inputs `func` refuses; `limits`,
    function -> (traceable, head dims) of the imported ones (a function not listed has no limits)."""
    found = []
    for module, traceable, head_dims in _FLASH_INTERFACES:
        try:
            found.append((getattr(__import__(module, fromlist=["flash_attn_func"]), "flash_attn_func"),
                          traceable, head_dims))
        except Exception:  # an optional dependency may fail to import in many ways (CUDA, DSL, ABI)
            continue
    func = found[0][0] if found else None
    fallback = next((f for f, traceable, dims in found[1:] if traceable and dims is None), None)
    return {"func": func, "fallback": fallback, "limits": {f: (traceable, dims) for f, traceable, dims in found}}


# The seam of the flash path: "func" (and "fallback") take (B, N, H, Dh) tensors on "device_type". Tests put a
# stand-in here (backed by SDPA, on CPU) to hold the glue below to SDPA.
_FLASH = {**(_import_flash_attn() if torch.cuda.is_available() else {"func": None, "fallback": None, "limits": {}}),
          "device_type": "cuda"}


def _flash_func(q: Tensor):
    """The flash implementation for q: `func` unless it cannot take q's head dim, or cannot be traced and a
    torch.compile trace is running; then the fallback under the same rules; else None (SDPA)."""
    for func in (_FLASH["func"], _FLASH.get("fallback")):
        if func is None:
            continue
        traceable, head_dims = _FLASH.get("limits", {}).get(func, (True, None))
        if (traceable or not torch.compiler.is_compiling()) and (head_dims is None or q.shape[-1] in head_dims):
            return func
    return None


def _flash_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (_FAST["enabled"] and q.device.type == _FLASH.get("device_type", "cuda")
            and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and q.shape[1] == k.shape[1] == v.shape[1] and _flash_func(q) is not None)


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """flash-attn on (B, H, N, Dh) tensors; its causal mask is aligned to the bottom-right corner."""
    out = _flash_func(q)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    if isinstance(out, tuple):  # v3 (some releases) and v4 also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


def attention(q, k, v, attn_mask=None, is_causal: bool = False):
    """q, k, v: (B, H, N, Dh). attn_mask: bool, True = may attend. is_causal is top-left aligned (as in SDPA)."""
    # flash-attn aligns causal masks bottom-right; the two agree only for square attention.
    if attn_mask is None and (not is_causal or q.shape[-2] == k.shape[-2]) and _flash_applies(q, k, v):
        return _flash(q, k, v, causal=is_causal)
    return reference.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def _causal_bottom_right(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Query i of Lq sees keys j <= i + (Lk - Lq)."""
    if _flash_applies(q, k, v):
        return _flash(q, k, v, causal=True)
    lq, lk = q.shape[-2], k.shape[-2]
    # An explicit mask rather than torch.nn.attention.bias.causal_lower_right: that tensor subclass breaks
    # torch.compile(fullgraph=True) graphs.
    rows = torch.arange(lq, device=q.device).unsqueeze(1)
    mask = torch.arange(lk, device=q.device).unsqueeze(0) <= rows + (lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def slot_encoder_attention(q, k, v, num_image_tokens: int):
    """Attention of the slot encoder: image tokens see image tokens only, slot i sees image tokens and slots <= i.

    Fast form (exact): image queries over image keys with no mask, plus slot queries over all keys with a
    bottom-right causal mask, concatenated. Reference form: one call with the full boolean mask.
    """
    n = q.shape[-2]
    if not _FAST["enabled"]:
        mask = encoder_attention_mask(num_image_tokens, n - num_image_tokens, q.device)
        return reference.attention(q, k, v, attn_mask=mask)
    if num_image_tokens >= n:
        return attention(q, k, v)
    slots = _causal_bottom_right(q[:, :, num_image_tokens:], k, v)
    if num_image_tokens == 0:
        return slots
    image = attention(q[:, :, :num_image_tokens], k[:, :, :num_image_tokens], v[:, :, :num_image_tokens])
    return torch.cat([image, slots], dim=-2)


def encoder_attention_mask(num_image_tokens: int, num_slots: int, device=None) -> torch.Tensor:
    """Boolean (N, N) mask, True = may attend, with N = num_image_tokens + num_slots."""
    n = num_image_tokens + num_slots
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:num_image_tokens, :num_image_tokens] = True
    mask[num_image_tokens:, :num_image_tokens] = True
    mask[num_image_tokens:, num_image_tokens:] = torch.ones(num_slots, num_slots, dtype=torch.bool, device=device).tril()
    return mask
