"""Nested dropout: the distribution of kept-prefix lengths, and the masking with learned null slots (values, grads)."""
import pytest
import torch

from semanticist_fast.common.noise import BatchNoise
from semanticist_fast.kernels import dispatch
from semanticist_fast.models.nested_dropout import NestedDropout, NestedDropoutConfig

DRAWS = 200_000


def _counts(keep: torch.Tensor, K: int) -> torch.Tensor:
    return torch.bincount(keep, minlength=K + 1).double()


def _chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def _noise(seed: int, n: int = 0) -> "_Draws":
    return _Draws(seed)


class _Draws:
    """A BatchNoise for whatever batch size the test asks (all rows)."""

    def __init__(self, seed):
        self.seed, self.sources = seed, {}

    def _source(self, n):
        if n not in self.sources:
            self.sources[n] = BatchNoise(self.seed, n, slice(None), "cpu")
        return self.sources[n]

    def rand(self, n, *rest):
        return self._source(n).rand(n, *rest)

    def randint(self, low, high, n, *rest):
        return self._source(n).randint(low, high, n, *rest)


def _sampler(K=16, p=0.1, after=5, unit="epoch", enabled=True):
    cfg = NestedDropoutConfig(enabled=enabled, enable_nest_after=after, unit=unit, full_drop_prob=p)
    cfg.validate()
    return NestedDropout(cfg, K)


@pytest.mark.parametrize("p", [0.1, 0.0, 0.3])
def test_before_nesting_keeps_all_except_full_drops(p):
    K = 16
    nd = _sampler(K=K, p=p, after=5)
    keep = nd.sample_keep(DRAWS, step=10_000, epoch=4, device="cpu", rng=_noise(0))
    assert keep.shape == (DRAWS,) and keep.dtype == torch.int64
    assert set(keep.unique().tolist()) <= {0, K}
    frac_zero = (keep == 0).double().mean().item()
    # Binomial standard error at 200k draws is <= 0.0011: 5 sigma.
    assert abs(frac_zero - p) < 0.0055, frac_zero


@pytest.mark.parametrize("K", [16, 7])
def test_during_nesting_uniform_prefix_plus_full_drops(K):
    p = 0.1
    nd = _sampler(K=K, p=p, after=5)
    keep = nd.sample_keep(DRAWS, step=0, epoch=5, device="cpu", rng=_noise(1))
    assert keep.min() >= 0 and keep.max() <= K
    counts = _counts(keep, K)
    probs = torch.full((K + 1,), (1 - p) / K, dtype=torch.float64)
    probs[0] = p  # the fixed reference flaw: the all-null condition is still trained during nesting
    chi2 = _chi_square(counts, probs)
    # df = K; the 99.999th percentile of chi-square with 16 degrees of freedom is about 52.
    assert chi2 < 55, (chi2, counts.tolist())
    assert abs(counts[0].item() / DRAWS - p) < 0.0055
    # Every prefix length 1..K actually occurs, with roughly equal frequency.
    assert (counts[1:] > 0).all()
    assert (counts[1:] / DRAWS - (1 - p) / K).abs().max() < 0.01


def test_full_drop_prob_zero_during_nesting_never_drops_everything():
    K = 9
    nd = _sampler(K=K, p=0.0, after=0)
    keep = nd.sample_keep(50_000, step=0, epoch=0, device="cpu", rng=_noise(2))
    counts = _counts(keep, K)
    assert counts[0] == 0
    probs = torch.full((K,), 1 / K, dtype=torch.float64)
    assert _chi_square(counts[1:], probs) < 40


def test_seeded_draws_are_reproducible():
    nd = _sampler()
    a = nd.sample_keep(1000, 0, 10, "cpu", rng=_noise(7))
    b = nd.sample_keep(1000, 0, 10, "cpu", rng=_noise(7))
    assert torch.equal(a, b)


def test_draws_of_a_split_batch_are_those_of_the_whole():
    """Ranks draw their rows of the global batch: the keep counts do not depend on how the batch is split."""
    nd = _sampler(after=0)
    whole = nd.sample_keep(12, 0, 10, "cpu", rng=BatchNoise(5, 12, slice(0, 12), "cpu"))
    parts = [nd.sample_keep(4, 0, 10, "cpu", rng=BatchNoise(5, 12, slice(a, a + 4), "cpu")) for a in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)


def test_epoch_and_step_units():
    by_epoch = _sampler(after=50, unit="epoch")
    assert not by_epoch.nesting_active(step=10_000, epoch=49)
    assert by_epoch.nesting_active(step=0, epoch=50)
    by_step = _sampler(after=150, unit="step")
    assert not by_step.nesting_active(step=149, epoch=1000)
    assert by_step.nesting_active(step=150, epoch=0)
    disabled = _sampler(after=0, enabled=False)
    assert not disabled.nesting_active(step=10 ** 6, epoch=10 ** 6)
    # The unit decides which counter sample_keep looks at.
    g = _noise(3)
    keep = by_step.sample_keep(5000, step=149, epoch=1000, device="cpu", rng=g)
    assert set(keep.unique().tolist()) <= {0, 16}
    keep = by_step.sample_keep(5000, step=150, epoch=0, device="cpu", rng=g)
    assert len(set(keep.unique().tolist()) - {0, 16}) > 0


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_full_drop_prob_out_of_range_is_rejected(p):
    with pytest.raises(ValueError, match="full_drop_prob"):
        NestedDropoutConfig(full_drop_prob=p).validate()


def _expected_apply(tokens, null, keep):
    B, K, D = tokens.shape
    out = tokens.clone()
    for b in range(B):
        out[b, keep[b]:] = null.reshape(K, D)[keep[b]:]
    return out


@pytest.mark.parametrize("B,K,D", [(5, 16, 16), (3, 7, 5), (1, 1, 3)])
@pytest.mark.parametrize("null_shape", ["1KD", "KD"])
def test_apply_replaces_exactly_the_dropped_suffix(fast_paths, B, K, D, null_shape):
    g = torch.Generator().manual_seed(B * K + D)
    tokens = torch.randn(B, K, D, generator=g)
    null = torch.randn(1, K, D, generator=g)
    if null_shape == "KD":
        null = null[0]
    keep = torch.randint(0, K + 1, (B,), generator=g)
    keep[0] = 0
    if B > 1:
        keep[1] = K
    out = dispatch.nested_dropout(tokens, null, keep)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    assert torch.equal(out, _expected_apply(tokens, null, keep))


def test_apply_gradients(fast_paths):
    g = torch.Generator().manual_seed(11)
    B, K, D = 6, 9, 4
    tokens = torch.randn(B, K, D, generator=g, requires_grad=True)
    null = torch.randn(1, K, D, generator=g, requires_grad=True)
    keep = torch.tensor([0, 9, 3, 1, 8, 3])
    upstream = torch.randn(B, K, D, generator=g)
    (dispatch.nested_dropout(tokens, null, keep) * upstream).sum().backward()

    kept = (torch.arange(K)[None, :] < keep[:, None]).unsqueeze(-1)  # (B, K, 1)
    torch.testing.assert_close(tokens.grad, torch.where(kept, upstream, torch.zeros_like(upstream)))
    expected_null = torch.where(kept, torch.zeros_like(upstream), upstream).sum(0, keepdim=True)
    assert null.grad.shape == null.shape
    torch.testing.assert_close(null.grad, expected_null, rtol=1e-6, atol=1e-6)
    # Positions no sample dropped get no gradient on their null vector; position 0 is dropped only by keep=0.
    torch.testing.assert_close(null.grad[0, 0], upstream[0, 0])


def test_apply_bf16(fast_paths):
    g = torch.Generator().manual_seed(12)
    tokens = torch.randn(4, 8, 16, generator=g).bfloat16()
    null = torch.randn(1, 8, 16, generator=g)  # a float32 parameter under bf16 activations
    keep = torch.tensor([2, 0, 8, 5])
    out = dispatch.nested_dropout(tokens, null, keep)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _expected_apply(tokens, null.bfloat16(), keep))
