"""Gaussian diffusion against closed forms computed here in float64, respacing, and oracle-driven samplers."""
import math

import pytest
import torch

from semanticist_fast.diffusion.gaussian import GaussianDiffusion, sampler_for
from semanticist_fast.diffusion.schedules import cosine_betas, linear_betas, make_betas, space_timesteps

T = 1000
F32 = dict(rtol=2e-5, atol=1e-6)  # the tables are float32 copies of float64 values


def _linear_betas_f64(n=T):
    return torch.linspace(1e-4 * 1000 / n, 0.02 * 1000 / n, n, dtype=torch.float64)


def _abar(betas):
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.create(T, "linear", learn_sigma=True)


def _bcast(v, ndim):
    return v.reshape(-1, *([1] * (ndim - 1)))


# ---- schedules ----

def test_linear_and_cosine_betas():
    torch.testing.assert_close(linear_betas(T), _linear_betas_f64(), rtol=1e-12, atol=0)
    torch.testing.assert_close(linear_betas(250), _linear_betas_f64(250), rtol=1e-12, atol=0)
    assert linear_betas(250)[-1].item() == pytest.approx(0.08)  # endpoints scaled with the chain length
    cos = cosine_betas(T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(cos, expected, rtol=1e-12, atol=0)
    assert cos.max().item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="linear"):
        make_betas("quadratic", 10)


def test_tables_are_non_persistent_buffers(diffusion):
    buffers = dict(diffusion.named_buffers())
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "timestep_map"):
        assert name in buffers
    assert diffusion.state_dict() == {}
    torch.testing.assert_close(diffusion.alphas_cumprod.double(), _abar(_linear_betas_f64()), **F32)


# ---- forward process ----

def test_q_sample_closed_form(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g)
    noise = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 777, 999])
    abar = _bcast(_abar(_linear_betas_f64())[t], 4)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise).double(), expected, **F32)


@pytest.mark.parametrize("t", [3, 500, 999])
def test_q_sample_empirical_moments(diffusion, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(1, 7, generator=g)
    n = 40_000
    noise = torch.randn(n, 7, generator=g)
    xt = diffusion.q_sample(x0.expand(n, -1), torch.full((n,), t), noise).double()
    abar = _abar(_linear_betas_f64())[t]
    # 5 standard errors of the mean / variance estimates at 40k samples.
    se = math.sqrt((1 - abar) / n)
    assert (xt.mean(0) - abar.sqrt() * x0.double()[0]).abs().max() < 5 * se
    assert (xt.var(0) / (1 - abar) - 1).abs().max() < 5 * math.sqrt(2 / n)


def test_posterior_matches_bayes_rule(diffusion):
    betas = _linear_betas_f64()
    abar = _abar(betas)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, 10, 400, 998, 999])
    x0 = torch.randn(6, 2, 3, generator=g)
    xt = torch.randn(6, 2, 3, generator=g)
    mean, var, log_var = diffusion.q_posterior(x0, xt, t)

    # q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}),  q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t):
    # the product of the two Gaussians in x_{t-1} has precision and precision-weighted mean that add.
    prev, b, alpha = _bcast(abar[t - 1], 3), _bcast(betas[t], 3), _bcast(1 - betas[t], 3)
    precision = 1 / (1 - prev) + alpha / b
    bayes_var = 1 / precision
    bayes_mean = bayes_var * (prev.sqrt() * x0.double() / (1 - prev) + alpha.sqrt() * xt.double() / b)
    torch.testing.assert_close(mean.double(), bayes_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var.double().expand_as(bayes_var), bayes_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(log_var.double(), bayes_var.log(), rtol=1e-5, atol=1e-5)


def test_posterior_at_t0_is_x0_with_clipped_log_variance(diffusion):
    x0, xt = torch.randn(2, 5), torch.randn(2, 5)
    t = torch.zeros(2, dtype=torch.long)
    mean, var, log_var = diffusion.q_posterior(x0, xt, t)
    torch.testing.assert_close(mean, x0, rtol=1e-6, atol=1e-6)
    assert (var == 0).all()
    torch.testing.assert_close(log_var, diffusion.posterior_log_variance_clipped[1].expand_as(log_var))


def test_predict_xstart_and_eps_invert_q_sample(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    eps = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = diffusion.q_sample(x0, t, eps)
    # float32 tables: 1/sqrt(abar) reaches ~160 at t=999, which scales the rounding error of x_t.
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(xt, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(xt, t, x0), eps, rtol=1e-4, atol=1e-4)
    # x_t built from the float64 closed form (not from q_sample) inverts as well.
    abar = _bcast(_abar(_linear_betas_f64())[t], 4)
    xt64 = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(xt64.float(), t, eps), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [0, 1, 37, 999])
def test_learned_range_variance_endpoints(diffusion, t):
    betas = _linear_betas_f64()
    abar = _abar(betas)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_clipped = torch.log(torch.where(torch.arange(T) == 0, post_var[1], post_var))
    x = torch.randn(2, 3, 4, 4)
    tt = torch.full((2,), t)
    eps = torch.randn(2, 3, 4, 4)
    for v, expected in ((-1.0, post_log_clipped[t]), (1.0, betas[t].log()),
                        (0.0, 0.5 * (post_log_clipped[t] + betas[t].log()))):
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        _, log_var, _, eps_out = diffusion.p_mean_variance(out, x, tt)
        torch.testing.assert_close(log_var.double(), torch.full_like(log_var, expected.item()).double(),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(eps_out, eps)


def test_p_mean_with_true_eps_is_the_true_posterior_mean(diffusion):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([1, 300, 900])
    xt = diffusion.q_sample(x0, t, eps)
    out = torch.cat([eps, torch.zeros_like(eps)], dim=1)
    mean, _, pred_x0, _ = diffusion.p_mean_variance(out, xt, t)
    true_mean, _, _ = diffusion.q_posterior(x0, xt, t)
    torch.testing.assert_close(pred_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, true_mean, rtol=1e-4, atol=1e-4)


# ---- respacing ----

def test_space_timesteps_250():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 == len(set(kept))
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == 999
    gaps = torch.diff(torch.tensor(kept))
    assert gaps.min() >= 4 and gaps.max() <= 5


def test_space_timesteps_ddim_and_sections():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "") == list(range(1000))
    two = space_timesteps(100, "10,5")
    assert len(two) == 15 and two[0] == 0 and two[9] == 49 and two[10] == 50 and two[-1] == 99
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")  # no stride gives exactly 999 steps from 1000
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="ddim25"):
        space_timesteps(1000, "fast")


@pytest.mark.parametrize("spacing", ["250", "ddim25", "10,3"])
def test_respaced_chain_keeps_alphas_cumprod(spacing):
    base = GaussianDiffusion.create(T, "linear")
    spaced = GaussianDiffusion.create(T, "linear", respacing=spacing)
    kept = torch.tensor(space_timesteps(T, spacing))
    assert spaced.num_timesteps == len(kept)
    assert torch.equal(spaced.timestep_map, kept)
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-6, atol=1e-9)
    t = torch.arange(len(kept))
    assert torch.equal(spaced.model_timesteps(t), kept)


def test_sampler_for_picks_method():
    d, method = sampler_for("ddim25")
    assert method == "ddim" and d.num_timesteps == 25
    d, method = sampler_for("250")
    assert method == "ancestral" and d.num_timesteps == 250
    assert torch.equal(GaussianDiffusion.create(T, respacing="").timestep_map, torch.arange(T))


# ---- training loss and samplers with an oracle ----

@pytest.mark.parametrize("learn_sigma", [True, False])
def test_training_losses_perfect_eps_oracle(learn_sigma):
    d = GaussianDiffusion.create(T, "linear", learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 5, 100, 500, 999])
    seen = {}

    def oracle(x_t, timesteps):
        seen["t"] = timesteps
        torch.testing.assert_close(x_t, d.q_sample(x0, t, noise))
        # var = -1: the true posterior variance, so the VLB term is ~0 for t > 0
        return torch.cat([noise, -torch.ones_like(noise)], dim=1) if learn_sigma else noise.clone()

    terms = d.training_losses(oracle, x0, t, noise=noise)
    assert torch.equal(seen["t"], t)
    assert terms["mse"].shape == (6,) and (terms["mse"] == 0).all()
    if learn_sigma:
        assert terms["vb"].shape == (6,)
        assert (terms["vb"][1:].abs() < 1e-3).all(), terms["vb"]
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    else:
        assert "vb" not in terms and torch.equal(terms["loss"], terms["mse"])


def test_training_losses_mse_value_and_timestep_map():
    d = GaussianDiffusion.create(T, "linear", respacing="ddim25", learn_sigma=False)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 7, 24])
    offset = torch.randn(3, 2, 4, 4, generator=g)
    seen = {}

    def model(x_t, timesteps):
        seen["t"] = timesteps
        return noise + offset

    terms = d.training_losses(model, x0, t, noise=noise)
    assert torch.equal(seen["t"], torch.tensor([0, 280, 960]))  # the network sees the original timesteps
    torch.testing.assert_close(terms["mse"], (offset ** 2).mean(dim=(1, 2, 3)))


def _true_eps_oracle(x0: torch.Tensor, learn_sigma: bool):
    """The exact eps of x_t given the one data point x0; timesteps are on the 1000-step training scale."""
    abar = _abar(_linear_betas_f64())

    def model(x_t, timesteps):
        a = _bcast(abar[timesteps], x_t.ndim)
        eps = ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model


@pytest.mark.parametrize("steps", ["ddim25", "ddim10", "250"])
def test_samplers_with_true_eps_oracle_recover_x0(steps):
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1
    d, method = sampler_for(steps, T, "linear", learn_sigma=True)
    noise = torch.randn(2, 3, 6, 6, generator=g)
    x_T = GaussianDiffusion.create(T).q_sample(x0, torch.full((2,), 999), noise)  # the noised data point
    out = d.sample(_true_eps_oracle(x0, True), x_T, method=method, generator=g)
    assert out.shape == x0.shape
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_ddim_is_deterministic_and_fixed_variance_chain_works():
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(1, 2, 3, 3, generator=g)
    d = GaussianDiffusion.create(T, "linear", respacing="ddim25", learn_sigma=False)
    noise = torch.randn(1, 2, 3, 3, generator=g)
    a = d.ddim_sample_loop(_true_eps_oracle(x0, False), noise)
    b = d.ddim_sample_loop(_true_eps_oracle(x0, False), noise)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, x0, rtol=1e-4, atol=1e-4)
    fixed = d.p_sample_loop(_true_eps_oracle(x0, False), noise, generator=g)
    torch.testing.assert_close(fixed, x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="ancestral"):
        d.sample(_true_eps_oracle(x0, False), noise, method="heun")
