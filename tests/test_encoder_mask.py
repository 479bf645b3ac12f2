"""The slot encoder's attention pattern: image tokens never see slots, slot i sees the image and slots <= i.

Checked three ways: the boolean mask itself, the fused/split attention against a masked softmax written out in
float64, and the behaviour of a whole (small, random, float64) SlotEncoder under perturbations of its inputs.
"""
import math

import pytest
import torch

from semanticist_fast.kernels import dispatch
from semanticist_fast.models.vit import EncoderConfig, SlotEncoder


def _expected_mask(n_img: int, n_slots: int) -> torch.Tensor:
    n = n_img + n_slots
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < n_img:
                mask[i, j] = j < n_img
            else:
                mask[i, j] = j < n_img or (j - n_img) <= (i - n_img)
    return mask


@pytest.mark.parametrize("n_img,n_slots", [(1, 1), (5, 7), (17, 3), (10, 0), (0, 6), (2, 32)])
def test_encoder_attention_mask_pattern(n_img, n_slots):
    mask = dispatch.encoder_attention_mask(n_img, n_slots)
    assert mask.dtype == torch.bool and mask.shape == (n_img + n_slots, n_img + n_slots)
    assert torch.equal(mask, _expected_mask(n_img, n_slots))
    # Spelled out once more in words: image rows see exactly the image, slot row i sees the image and slots 0..i.
    assert mask[:n_img, :n_img].all() and not mask[:n_img, n_img:].any()
    for i in range(n_slots):
        row = mask[n_img + i]
        assert row[:n_img].all()
        assert row[n_img:n_img + i + 1].all() and not row[n_img + i + 1:].any()


def _masked_attention_f64(q, k, v, mask):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("n_img,n_slots,heads,head_dim", [(5, 7, 3, 12), (17, 3, 2, 8), (1, 9, 1, 5), (9, 0, 2, 4),
                                                          (0, 5, 2, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slot_encoder_attention_matches_masked_softmax(fast_paths, n_img, n_slots, heads, head_dim, dtype):
    g = torch.Generator().manual_seed(n_img * 100 + n_slots)
    n = n_img + n_slots
    q, k, v = (torch.randn(3, heads, n, head_dim, generator=g, dtype=dtype) for _ in range(3))
    out = dispatch.slot_encoder_attention(q, k, v, num_image_tokens=n_img)
    expected = _masked_attention_f64(q, k, v, _expected_mask(n_img, n_slots))
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_slot_encoder_attention_gradients_match(fast_paths):
    g = torch.Generator().manual_seed(3)
    n_img, n_slots = 6, 5
    q, k, v = (torch.randn(2, 2, n_img + n_slots, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    w = torch.randn(2, 2, n_img + n_slots, 8, generator=g, dtype=torch.float64)
    (dispatch.slot_encoder_attention(q, k, v, num_image_tokens=n_img) * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (_masked_attention_f64(q, k, v, _expected_mask(n_img, n_slots)) * w).sum().backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, rtol=1e-10, atol=1e-12)


# ---- behaviour of a whole encoder ----

IMAGE, PATCH, SLOTS = 12, 4, 7  # 9 patches + cls = 10 image tokens


def _encoder() -> SlotEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(size="custom", dim=24, depth=3, heads=3, patch_size=PATCH, num_slots=SLOTS, drop_path=0.0)
    enc = SlotEncoder(cfg, IMAGE).double().eval()
    # Larger-than-init embeddings so every perturbation moves the outputs well above rounding.
    with torch.no_grad():
        enc.slot_embed.normal_()
        enc.pos_embed.normal_()
    return enc


def _run_with_hidden(enc: SlotEncoder, images: torch.Tensor):
    """(slot outputs, [hidden state after each block]) for one forward."""
    hidden = []
    hooks = [b.register_forward_hook(lambda m, i, o: hidden.append(o.detach().clone())) for b in enc.blocks]
    try:
        with torch.no_grad():
            out = enc(images)
    finally:
        for h in hooks:
            h.remove()
    return out, hidden


@pytest.mark.parametrize("j", [0, 3, SLOTS - 1])
def test_slot_perturbation_reaches_later_slots_only(fast_paths, j):
    enc = _encoder()
    n_img = 1 + (IMAGE // PATCH) ** 2
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out0, hidden0 = _run_with_hidden(enc, images)
    with torch.no_grad():
        enc.slot_embed[0, j] += torch.randn(enc.slot_embed.shape[-1], dtype=torch.float64)
    out1, hidden1 = _run_with_hidden(enc, images)

    assert out0.shape == (2, SLOTS, 24)
    for h0, h1 in zip(hidden0, hidden1):
        assert h0.shape == (2, n_img + SLOTS, 24)
        torch.testing.assert_close(h1[:, :n_img], h0[:, :n_img], rtol=0, atol=1e-12)  # image tokens: untouched
        torch.testing.assert_close(h1[:, n_img:n_img + j], h0[:, n_img:n_img + j], rtol=0, atol=1e-12)
    torch.testing.assert_close(out1[:, :j], out0[:, :j], rtol=0, atol=1e-12)
    change = (out1[:, j:] - out0[:, j:]).abs().amax(dim=-1)  # (B, SLOTS - j)
    assert (change > 1e-6).all(), change


def test_image_perturbation_reaches_every_slot(fast_paths):
    enc = _encoder()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    out0, hidden0 = _run_with_hidden(enc, images)
    perturbed = images.clone()
    perturbed[:, :, :PATCH, :PATCH] += 0.5 * torch.rand(2, 3, PATCH, PATCH, generator=g, dtype=torch.float64)
    out1, _ = _run_with_hidden(enc, perturbed)
    change = (out1 - out0).abs().amax(dim=-1)
    assert (change > 1e-6).all(), change


def test_encoder_fast_and_reference_paths_agree():
    enc = _encoder()
    images = torch.rand(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    previous = dispatch.fast_paths_enabled()
    try:
        dispatch.set_fast_paths(True)
        with torch.no_grad():
            fast = enc(images)
        dispatch.set_fast_paths(False)
        with torch.no_grad():
            ref = enc(images)
    finally:
        dispatch.set_fast_paths(previous)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
