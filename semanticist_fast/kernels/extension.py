"""Loads the compiled extension semanticist_fast._C and gives its `semanticist` ops fakes and autograd.

The C++ side (csrc/) defines the schemas and the CPU/CUDA kernels; this module adds what torch.compile and
autograd need: fake (meta) kernels so the ops trace with no graph break, and backward formulas.
If the extension was not built (SEMANTICIST_NO_EXT=1, or no `pip install -e .` / `build_ext --inplace` yet),
AVAILABLE is False and STATUS says why; the dispatch layer then uses the PyTorch references.
"""
import torch
from torch import Tensor

try:
    from .. import _C  # noqa: F401  (importing runs the C++ operator registrations)
except ImportError as e:
    AVAILABLE = False
    BUILT_WITH_CUDA = False
    STATUS = (f"semanticist_fast._C not available ({e}); build it with "
              "`pip install -c constraints.txt -e .` or `python setup.py build_ext --inplace`")
else:
    AVAILABLE = True
    BUILT_WITH_CUDA = bool(_C.built_with_cuda())
    STATUS = f"semanticist_fast._C loaded ({'CPU+CUDA' if BUILT_WITH_CUDA else 'CPU only'} kernels)"


def supports(t: Tensor) -> bool:
    """Whether the extension has a kernel for t's device."""
    return AVAILABLE and (t.device.type == "cpu" or (t.device.type == "cuda" and BUILT_WITH_CUDA))


def nested_dropout(tokens: Tensor, null: Tensor, keep: Tensor) -> Tensor:
    return torch.ops.semanticist.nested_dropout(tokens, null, keep)


def standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    return torch.ops.semanticist.standardize(x, float(eps))


if AVAILABLE:

    @torch.library.register_fake("semanticist::nested_dropout")
    def _(tokens, null, keep):
        return torch.empty_like(tokens, memory_format=torch.contiguous_format)

    @torch.library.register_fake("semanticist::nested_dropout_backward")
    def _(grad, keep):
        K, D = grad.shape[1], grad.shape[2]
        return torch.empty_like(grad, memory_format=torch.contiguous_format), grad.new_empty((K, D), dtype=torch.float32)

    @torch.library.register_fake("semanticist::standardize")
    def _(x, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("semanticist::standardize_backward")
    def _(grad, x, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _nested_dropout_setup(ctx, inputs, output):
        _, null, keep = inputs
        ctx.save_for_backward(keep)
        ctx.null_shape, ctx.null_dtype = null.shape, null.dtype

    def _nested_dropout_backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        grad_tokens, grad_null = torch.ops.semanticist.nested_dropout_backward(grad, keep)
        return grad_tokens, grad_null.reshape(ctx.null_shape).to(ctx.null_dtype), None

    torch.library.register_autograd("semanticist::nested_dropout", _nested_dropout_backward,
                                    setup_context=_nested_dropout_setup)

    def _standardize_setup(ctx, inputs, output):
        x, eps = inputs
        ctx.save_for_backward(x)
        ctx.eps = eps

    def _standardize_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.semanticist.standardize_backward(grad, x, ctx.eps), None

    torch.library.register_autograd("semanticist::standardize", _standardize_backward,
                                    setup_context=_standardize_setup)
