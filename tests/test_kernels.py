"""Every fast kernel against its PyTorch reference: forward and gradients, odd sizes, fp32 and bf16.

Triton kernels run on CUDA when there is a GPU, else through the Triton interpreter on CPU tensors; the
interpreter is switched on only while this file imports the kernel modules, so other tests never see it.
C++ ops are tested when semanticist_fast._C is built (else skipped with the build command as reason).
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from semanticist_fast.kernels import dispatch, extension, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
needs_ext = pytest.mark.skipif(not extension.AVAILABLE, reason=extension.STATUS)


@pytest.fixture(scope="module")
def tk() -> SimpleNamespace:
    """The Triton kernel modules, interpreted when there is no GPU."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    names = ["triton_adaln", "triton_rmsnorm", "triton_swiglu"]
    if DEVICE.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        already = sys.modules.get("semanticist_fast.kernels.triton_common")
        if already is not None and not isinstance(already.add, InterpretedFunction):
            pytest.skip("Triton kernels were imported without TRITON_INTERPRET=1 before this file ran")
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit at import (decoration) time only
        try:
            modules = [importlib.import_module(f"semanticist_fast.kernels.{n}") for n in names]
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    else:
        modules = [importlib.import_module(f"semanticist_fast.kernels.{n}") for n in names]
    return SimpleNamespace(**{n.removeprefix("triton_"): m for n, m in zip(names, modules)})


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    dispatch.set_fast_paths(True)
    dispatch.force_triton(os.environ.get("SEMANTICIST_FORCE_TRITON") == "1")


def _tol(dtype: torch.dtype) -> float:
    # bf16 keeps 8 bits; the CPU interpreter also truncates (not rounds) fp32 -> bf16 stores.
    return {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 4e-2}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).abs().max().item()
    scale = max(expected.float().abs().max().item(), 1.0)
    assert err <= _tol(dtype) * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def check_against_reference(fast, ref, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """fast(*inputs) == ref(*inputs), and so are the gradients of a random projection of all outputs."""
    a_in, b_in = leaves(*inputs), leaves(*inputs)
    a_out, b_out = fast(*a_in), ref(*b_in)
    a_out = a_out if isinstance(a_out, tuple) else (a_out,)
    b_out = b_out if isinstance(b_out, tuple) else (b_out,)
    for a, b in zip(a_out, b_out, strict=True):
        assert_close(a, b, dtype)
    weights = [torch.randn(o.shape, device=o.device) for o in b_out]
    loss_a = sum((o.float() * w).sum() for o, w in zip(a_out, weights))
    loss_b = sum((o.float() * w).sum() for o, w in zip(b_out, weights))
    diff = [t for t in a_in if t.requires_grad]
    grads_a = torch.autograd.grad(loss_a, diff)
    grads_b = torch.autograd.grad(loss_b, [t for t in b_in if t.requires_grad])
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert_close(ga, gb, dtype)


def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


ADALN_SHAPES = [(2, 5, 37), (3, 1, 64), (1, 9, 130)]


# ---------------------------------------------------------------- Triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADALN_SHAPES)
def test_triton_layernorm_modulate(tk, shape, dtype):
    B, N, C = shape
    inputs = [rand(B, N, C, dtype=dtype) * 3 + 1, rand(B, C, dtype=dtype), rand(B, C, dtype=dtype)]
    check_against_reference(lambda x, sh, sc: tk.adaln.layernorm_modulate(x, sh, sc, 1e-6),
                            lambda x, sh, sc: reference.layernorm_modulate(x, sh, sc, 1e-6), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADALN_SHAPES)
def test_triton_gated_residual(tk, shape, dtype):
    B, N, C = shape
    inputs = [rand(B, N, C, dtype=dtype), rand(B, C, dtype=dtype), rand(B, N, C, dtype=dtype)]
    check_against_reference(tk.adaln.gated_residual, reference.gated_residual, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADALN_SHAPES)
def test_triton_gated_residual_layernorm_modulate(tk, shape, dtype):
    B, N, C = shape
    inputs = [rand(B, N, C, dtype=dtype), rand(B, C, dtype=dtype), rand(B, N, C, dtype=dtype),
              rand(B, C, dtype=dtype), rand(B, C, dtype=dtype)]
    check_against_reference(lambda *a: tk.adaln.gated_residual_layernorm_modulate(*a, eps=1e-6),
                            lambda *a: reference.gated_residual_layernorm_modulate(*a, eps=1e-6), inputs, dtype)


def test_triton_adaln_mixed_dtypes(tk):
    """bf16 activations with fp32 conditioning (autocast leaves some fp32): output dtypes follow the reference."""
    B, N, C = 2, 3, 19
    x, y = rand(B, N, C, dtype=torch.bfloat16), rand(B, N, C, dtype=torch.bfloat16)
    gate, shift, scale = rand(B, C), rand(B, C), rand(B, C)
    check_against_reference(lambda *a: tk.adaln.gated_residual_layernorm_modulate(*a, eps=1e-6),
                            lambda *a: reference.gated_residual_layernorm_modulate(*a, eps=1e-6),
                            [x, gate, y, shift, scale], torch.bfloat16)
    check_against_reference(lambda *a: tk.adaln.layernorm_modulate(*a, 1e-6),
                            lambda *a: reference.layernorm_modulate(*a, 1e-6), [x, shift, scale], torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 45), (5, 128), (1, 1, 33)])
def test_triton_rms_norm(tk, shape, dtype):
    inputs = [rand(*shape, dtype=dtype) * 2, rand(shape[-1]) + 1]  # fp32 weight, as a parameter under autocast
    check_against_reference(lambda x, w: tk.rmsnorm.rms_norm(x, w, 1e-5),
                            lambda x, w: reference.rms_norm(x, w, 1e-5), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1031), (2, 3, 7)])
def test_triton_swiglu(tk, shape, dtype):
    inputs = [rand(*shape, dtype=dtype) * 3, rand(*shape, dtype=dtype)]
    check_against_reference(tk.swiglu.swiglu, reference.swiglu, inputs, dtype)


def test_triton_ops_compile_fullgraph(tk):
    """The Triton custom ops trace into one graph (fakes + autograd) and match eager, forward and backward."""
    dispatch.force_triton(True)

    def block(x, gate, y, shift, scale, w, a, b):
        x, h = dispatch.gated_residual_layernorm_modulate(x, gate, y, shift, scale)
        h = dispatch.layernorm_modulate(h, shift, scale) + dispatch.gated_residual(x, gate, y)
        return dispatch.rms_norm(h, w) * dispatch.swiglu(a, b)

    B, N, C = 2, 3, 20
    inputs = [rand(B, N, C), rand(B, C), rand(B, N, C), rand(B, C), rand(B, C), rand(C), rand(B, N, C),
              rand(B, N, C)]
    torch._dynamo.reset()
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # CPU: the kernels run in the interpreter
    check_against_reference(torch.compile(block, fullgraph=True, backend=backend), block, inputs, torch.float32)


def _run_without_interpreter(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """A fresh Python with compilable (not interpreted) kernels: this process imports them interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])


def test_triton_kernels_compile_for_sm90(tmp_path):
    """The interpreter checks numerics, not lowering: compile every launch the wrappers make (no GPU needed)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    result = _run_without_interpreter(["-m", "semanticist_fast.kernels.triton_aot", "--arch", "90"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    # The widths' block and warp choices, fp16, and autocast's fp32 residual stream with bf16 conditioning.
    for needle in ("_adaln_fwd_kernel [fp32,bf16,bf16,bf16,bf16,fp32,fp32,fp32,fp32] HAS_RESIDUAL=True HAS_NORM=True "
                   "BLOCK_C=2048 warps=8",
                   "_adaln_bwd_kernel [fp16,fp16,fp16,fp16,fp16,fp16,fp32,fp32,fp16,fp16,fp32,fp32,fp32] "
                   "HAS_RESIDUAL=True HAS_NORM=True BLOCK_C=1024 warps=4",
                   "_rms_bwd_kernel [fp32,fp32,fp32,fp32,fp32,fp32] BLOCK_C=2048 warps=8",
                   "_swiglu_bwd_kernel [bf16,bf16,bf16,bf16,bf16] BLOCK=1024 warps=4"):
        assert any(line.startswith("ok " + needle) for line in lines), needle
    kernels = {line.split()[1] for line in lines}
    assert kernels == {f"_{k}_{d}_kernel" for k in ("adaln", "rms", "swiglu") for d in ("fwd", "bwd")}
    assert len(lines) == len(set(lines)) >= 100


def test_aot_widths_are_the_published_model_widths(tmp_path):
    from semanticist_fast.models.dit import DIT_SIZES
    from semanticist_fast.models.gpt import GPT_SIZES

    result = _run_without_interpreter(
        ["-c", "from semanticist_fast.kernels.triton_aot import PUBLISHED_WIDTHS; print(*PUBLISHED_WIDTHS)"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    widths = {int(w) for w in result.stdout.split()}
    published = {DIT_SIZES[s][1] for s in ("B", "L", "XL")} | {GPT_SIZES[s][2] for s in ("B", "L", "XL")}
    assert widths == published == {768, 1024, 1152, 1280}


MODEL_LAUNCHES = """
import itertools, sys, torch
sys.path.insert(0, ".")
from benchmarks import bench_train
from semanticist_fast.kernels import dispatch, triton_aot
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend

def kinds(launches):  # what the dtype enumeration must cover: kernel, flags and pointer dtypes
    return {(l.kernel.__name__, tuple(v for _, v in l.signature if v.startswith("*")),
             tuple((k, v) for k, v in l.constexprs if k.startswith("HAS_"))) for l in launches}

dispatch.force_triton(True)
recorded = []
with triton_aot._recording(make_backend(GPUTarget("cuda", 90, 32)), recorded):
    for work, dtype in itertools.product(bench_train.presets("tiny", 2, True), (torch.bfloat16, torch.float16, None)):
        batch, frozen = work.make_inputs(torch.device("cpu"), 2, torch.Generator().manual_seed(0))
        task = work.make_task(torch.device("cpu"), frozen)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss, _ = task.loss(task.model.train(), batch, 0, bench_train.NESTING_EPOCH)
        loss.backward()
models = kinds(recorded)
assert len({k[0] for k in models}) == 6, models
missing = models - kinds(triton_aot.wrapper_launches(widths=(32,)))
assert not missing, missing
print(len(models), "kinds of launch, all enumerated")
"""


def test_aot_dtypes_cover_what_the_models_launch_under_autocast(tmp_path):
    """The tiny tokenizer and AR model, forward and backward in fp32 and under bf16 / fp16 autocast, with the
    kernels recorded instead of run: every launch's pointer dtypes and flags are among those the AOT check compiles."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    result = _run_without_interpreter(["-c", MODEL_LAUNCHES], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "all enumerated" in result.stdout


def test_dispatch_routes(tk, monkeypatch):
    """Fast paths on: Triton (forced here on CPU); off: the reference, whatever else is set."""
    calls = []
    plain = reference.layernorm_modulate
    monkeypatch.setattr(tk.adaln, "layernorm_modulate", lambda *a: calls.append("triton") or plain(*a))
    monkeypatch.setattr(reference, "layernorm_modulate", lambda *a: calls.append("ref") or plain(*a))
    x, shift, scale = rand(2, 3, 8), rand(2, 8), rand(2, 8)
    dispatch.force_triton(True)
    dispatch.layernorm_modulate(x, shift, scale)
    dispatch.set_fast_paths(False)
    dispatch.layernorm_modulate(x, shift, scale)
    dispatch.set_fast_paths(True)
    dispatch.layernorm_modulate(x.double(), shift.double(), scale.double())  # no float64 kernel: reference
    if DEVICE.type == "cpu":
        dispatch.force_triton(False)
        dispatch.layernorm_modulate(x, shift, scale)
        assert calls == ["triton", "ref", "ref", "ref"]
    else:
        assert calls == ["triton", "ref", "ref"]


# ---------------------------------------------------------------- C++ extension


def _keep(batch: int, k: int) -> torch.Tensor:
    keep = torch.randint(0, k + 1, (batch,), device=DEVICE)
    keep[0], keep[-1] = 0, k  # both ends: nothing kept, everything kept
    return keep


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,null_3d", [((5, 7, 3), True), ((3, 16, 16), False), ((40, 9, 5), True)])
def test_ext_nested_dropout(shape, null_3d, dtype):
    B, K, D = shape
    keep = _keep(B, K)
    null = rand(1, K, D) if null_3d else rand(K, D)  # an fp32 parameter, whatever the token dtype
    check_against_reference(lambda t, n: extension.nested_dropout(t, n, keep),
                            lambda t, n: reference.nested_dropout(t, n, keep), [rand(B, K, D, dtype=dtype), null],
                            dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 16), (2, 9, 16), (3, 5, 2), (7, 33)])
def test_ext_standardize(shape, dtype):
    x = rand(*shape, dtype=dtype) * 4 + 2
    check_against_reference(lambda t: extension.standardize(t, 1e-6), lambda t: reference.standardize_tokens(t, 1e-6),
                            [x], dtype)


@needs_ext
def test_ext_opcheck():
    """Schema, fake kernels and autograd registration agree with the real kernels (torch.library.opcheck)."""
    B, K, D = 3, 6, 4
    tokens = rand(B, K, D).requires_grad_()
    null = rand(1, K, D).requires_grad_()
    torch.library.opcheck(torch.ops.semanticist.nested_dropout.default, (tokens, null, _keep(B, K)))
    torch.library.opcheck(torch.ops.semanticist.standardize.default, (rand(5, 16).requires_grad_(), 1e-6))


@needs_ext
def test_ext_compile_fullgraph():
    """torch.compile(fullgraph=True) over the C++ ops equals eager, forward and backward."""
    def tokens_out(z, null, keep):
        return dispatch.nested_dropout(dispatch.standardize_tokens(z * 2.0) + 1.0, null, keep)

    B, K, D = 4, 8, 16
    keep = _keep(B, K)
    torch._dynamo.reset()
    compiled = torch.compile(tokens_out, fullgraph=True, backend="inductor")
    check_against_reference(lambda z, n: compiled(z, n, keep), lambda z, n: tokens_out(z, n, keep),
                            [rand(B, K, D), rand(1, K, D)], torch.float32)


@needs_ext
def test_ext_dispatch_routes(monkeypatch):
    calls = []
    plain = reference.nested_dropout
    monkeypatch.setattr(reference, "nested_dropout", lambda *a: calls.append("ref") or plain(*a))
    tokens, null, keep = rand(2, 4, 3), rand(1, 4, 3), torch.tensor([1, 3], device=DEVICE)
    out = dispatch.nested_dropout(tokens, null, keep)
    assert calls == [] and torch.equal(out, plain(tokens, null, keep))
    dispatch.set_fast_paths(False)
    dispatch.nested_dropout(tokens, null, keep)
    assert calls == ["ref"]


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("n_img,n_slots", [(5, 7), (9, 3), (0, 6), (4, 0), (1, 1)])
def test_slot_encoder_attention_split_equals_mask(n_img, n_slots):
    dtype = torch.float32
    B, H, Dh = 2, 3, 8
    n = n_img + n_slots
    inputs = [rand(B, H, n, Dh), rand(B, H, n, Dh), rand(B, H, n, Dh)]

    def masked(q, k, v):
        return reference.attention(q, k, v, attn_mask=dispatch.encoder_attention_mask(n_img, n_slots, q.device))

    check_against_reference(lambda q, k, v: dispatch.slot_encoder_attention(q, k, v, n_img), masked, inputs, dtype)


def test_encoder_mask_layout():
    mask = dispatch.encoder_attention_mask(3, 4)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(mask, (j < 3) | ((i >= 3) & (j <= i)))


# ---- the flash-attn glue, through the dispatch seam with stand-ins for flash_attn_func ----


FLASH_DTYPE = torch.float16  # a flash dtype with the tighter tolerance


def _flash_like(q, k, v, scale, causal, bottom_right=True):
    """What flash-attn computes, on (B, N, H, Dh) tensors, by SDPA: its causal mask is aligned bottom-right."""
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "flash-attn needs a contiguous last dim"
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        offset = lk - lq if bottom_right else 0
        mask = torch.arange(lk, device=q.device)[None] <= torch.arange(lq, device=q.device)[:, None] + offset
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def flash_v2(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func's signature and defaults (v2)."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None
    return _flash_like(q, k, v, softmax_scale, causal)


def flash_v3(q, k, v, softmax_scale=None, causal=False):
    """flash_attn_interface / flash_attn.cute: no dropout argument at all, returns (out, log-sum-exp)."""
    return _flash_like(q, k, v, softmax_scale, causal), None


def _wrong_layout(q, k, v, softmax_scale=None, causal=False, **_):
    # Reads (B, N, H, Dh) as if it were (B, H, N, Dh).
    return _flash_like(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), softmax_scale, causal).transpose(1, 2)


WRONG_STAND_INS = {
    "layout": _wrong_layout,
    "scale": lambda q, k, v, softmax_scale=None, causal=False, **_: _flash_like(q, k, v, softmax_scale or 1.0, causal),
    "causal_ignored": lambda q, k, v, softmax_scale=None, causal=False, **_: _flash_like(q, k, v, softmax_scale, False),
    "causal_top_left": lambda q, k, v, softmax_scale=None, causal=False, **_: _flash_like(q, k, v, softmax_scale,
                                                                                           causal, bottom_right=False),
    "dropout_on_by_default": lambda q, k, v, dropout_p=0.1, softmax_scale=None, causal=False, **_: (
        torch.nn.functional.dropout(_flash_like(q, k, v, softmax_scale, causal), dropout_p)),
}


@pytest.fixture
def flash_stand_in(monkeypatch):
    """install(func): the dispatch's flash path calls func (counted) for tensors on this test's device."""
    calls = []

    def install(func):
        def counted(*args, **kwargs):
            calls.append(kwargs)
            return func(*args, **kwargs)
        monkeypatch.setitem(dispatch._FLASH, "func", counted)
        monkeypatch.setitem(dispatch._FLASH, "device_type", DEVICE.type)
        return calls
    return install


def _attention_cases():
    """(name, fast, reference, inputs): every call of the dispatch that takes the flash path, beside SDPA."""
    B, H, N, Dh = 2, 3, 17, 64  # H != N, so a transposed layout cannot pass by accident
    inputs = [rand(B, H, N, Dh, dtype=FLASH_DTYPE) for _ in range(3)]
    n_img, n_slots = 11, N - 11
    mask = dispatch.encoder_attention_mask(n_img, n_slots, DEVICE)
    return [
        ("full", lambda q, k, v: dispatch.attention(q, k, v), reference.attention, inputs),
        ("causal", lambda q, k, v: dispatch.attention(q, k, v, is_causal=True),
         lambda q, k, v: reference.attention(q, k, v, is_causal=True), inputs),
        ("slot_split", lambda q, k, v: dispatch.slot_encoder_attention(q, k, v, n_img),
         lambda q, k, v: reference.attention(q, k, v, attn_mask=mask), inputs),
    ]


@pytest.mark.parametrize("stand_in", [flash_v2, flash_v3], ids=["v2", "v3_v4"])
@pytest.mark.parametrize("case", range(3), ids=["full", "causal", "slot_split"])
def test_flash_glue_matches_sdpa(flash_stand_in, stand_in, case):
    """Layout, default scale, causal alignment (and the slot split built on it), no dropout: as SDPA."""
    calls = flash_stand_in(stand_in)
    _, fast, ref, inputs = _attention_cases()[case]
    check_against_reference(fast, ref, inputs, FLASH_DTYPE)
    assert calls, "the flash path was not taken: the test compared SDPA with itself"
    assert all("dropout_p" not in kw for kw in calls)  # flash v3/v4 have no such argument


@pytest.mark.parametrize("wrong", WRONG_STAND_INS)
def test_flash_glue_test_catches_a_wrong_flash(flash_stand_in, wrong):
    """The comparison above is strict enough: each way of getting flash-attn wrong fails in at least one case."""
    flash_stand_in(WRONG_STAND_INS[wrong])
    failures = 0
    for _, fast, ref, inputs in _attention_cases():
        try:
            check_against_reference(fast, ref, inputs, FLASH_DTYPE)
        except (AssertionError, RuntimeError):  # a wrong result, or shapes a wrong layout cannot even mask
            failures += 1
    assert failures > 0, f"a flash-attn stand-in with a wrong {wrong} passed"


def test_flash_glue_leaves_what_flash_cannot_do_to_sdpa(flash_stand_in):
    """Masks, fp32, non-square causal and head dims flash lacks take SDPA; fast paths off never reach flash."""
    calls = flash_stand_in(flash_v2)
    q = rand(2, 3, 5, 64, dtype=FLASH_DTYPE)
    kv = rand(2, 3, 9, 64, dtype=FLASH_DTYPE)
    dispatch.attention(q, kv, kv, is_causal=True)  # top-left causal over a longer key set
    dispatch.attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool, device=DEVICE))
    dispatch.attention(q.float(), q.float(), q.float())
    odd = rand(2, 3, 5, 20, dtype=FLASH_DTYPE)
    dispatch.attention(odd, odd, odd)
    dispatch.set_fast_paths(False)
    dispatch.attention(q, q, q)
    assert calls == []
    dispatch.set_fast_paths(True)
    dispatch.attention(q, q, q)
    assert len(calls) == 1


@pytest.mark.skipif(dispatch._FLASH["func"] is None, reason="flash-attn is not installed (or no GPU)")
@pytest.mark.parametrize("case", range(3), ids=["full", "causal", "slot_split"])
def test_installed_flash_attn_matches_sdpa(case):
    _, fast, ref, inputs = _attention_cases()[case]
    check_against_reference(fast, ref, inputs, FLASH_DTYPE)
