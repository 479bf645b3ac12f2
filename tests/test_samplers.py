"""The fewer-step samplers against closed forms: Gaussian data, whose exact denoiser and velocity are known, and
whose probability-flow ODE keeps each sample's standard score, so the exact end of every chain is known too.

DPM-Solver++(2M), Heun and Adams-Bashforth 2 must converge to it, at second order, and beat the first-order method
(DDIM, Euler) at the same number of network calls."""
import math

import pytest
import torch

from semanticist_fast.diffusion import flow
from semanticist_fast.diffusion.gaussian import DDPMProcess, GaussianDiffusion
from semanticist_fast.diffusion.sampling import HeadSampler, classifier_free_guidance, decoder_process
from semanticist_fast.diffusion.schedules import make_betas, space_timesteps

T = 1000
MU, S = 0.7, 0.3  # data N(MU, S^2) in every dimension


def _abar(schedule):
    return torch.cumprod(1 - make_betas(schedule, T), 0)


def gaussian_eps(schedule):
    """The exact epsilon of x_t for data N(MU, S^2), in float64; timesteps on the 1000-step training scale."""
    abar = _abar(schedule)

    def model(x, t):
        a = abar[t].reshape(-1, *([1] * (x.ndim - 1)))
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        x = x.double()
        x0 = MU + alpha * S * S / (alpha * alpha * S * S + sigma * sigma) * (x - alpha * MU)
        return ((x - alpha * x0) / sigma).float()

    return model


def exact_ddpm_end(z, schedule):
    """The chain's answer in the limit of exact integration: the PF-ODE from x = z at timestep 999 to timestep 0
    keeps w = (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2); at timestep 0 the samplers return E[x0 | x]."""
    abar = _abar(schedule)
    a_start, a_end = abar[-1], abar[0]
    w = (z.double() - a_start.sqrt() * MU) / (a_start * S * S + 1 - a_start).sqrt()
    x_end = a_end.sqrt() * MU + (a_end * S * S + 1 - a_end).sqrt() * w
    return MU + a_end.sqrt() * S * S / (a_end * S * S + 1 - a_end) * (x_end - a_end.sqrt() * MU)


def gaussian_velocity(x, t):
    """E[x1 - x0 | x_t = x] on the linear path x_t = t x1 + (1 - t) x0, x1 ~ N(MU, S^2), x0 ~ N(0, 1)."""
    return MU + (t * S * S - (1 - t)) / (t * t * S * S + (1 - t) ** 2) * (x - t * MU)


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- DPM-Solver++(2M) ----

def test_dpm_grid_is_quadratic_distinct_and_spans_the_chain():
    assert space_timesteps(T, "dpm10") == [0, 12, 49, 111, 197, 308, 444, 604, 789, 999]
    for n in (2, 20, 80, 500):
        kept = space_timesteps(T, f"dpm{n}")
        assert len(kept) == n and kept == sorted(set(kept)) and kept[0] == 0 and kept[-1] == T - 1
    assert space_timesteps(T, "dpm1000") == list(range(T))
    for bad in ("dpm1", "dpm1001", "dpmx"):
        with pytest.raises(ValueError, match="dpm"):
            space_timesteps(T, bad)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_first_order_is_ddim(schedule):
    chain = GaussianDiffusion.create(T, schedule, "dpm15", learn_sigma=False)
    z = _noise(64, 3)
    ddim = chain.ddim_sample_loop(gaussian_eps(schedule), z)
    torch.testing.assert_close(chain.dpm_solver_sample_loop(gaussian_eps(schedule), z, order=1), ddim,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_converges_at_second_order_and_beats_ddim(schedule):
    z = _noise(256, 4)
    exact = exact_ddpm_end(z, schedule)
    errors = {}
    for n in (10, 20, 40, 80):
        chain = GaussianDiffusion.create(T, schedule, f"dpm{n}", learn_sigma=False)
        second = (chain.dpm_solver_sample_loop(gaussian_eps(schedule), z).double() - exact).abs().max().item()
        first = (chain.ddim_sample_loop(gaussian_eps(schedule), z).double() - exact).abs().max().item()
        errors[n] = (first, second)
        assert second < first, (n, errors)  # the same grid, the same network calls
    assert errors[80][1] < 3e-3, errors
    # Halving the step from 20 calls on: the first-order error halves, the second-order error falls about 4x.
    for n in (20, 40):
        assert 1.7 < errors[n][0] / errors[2 * n][0] < 2.3, errors
        assert errors[n][1] / errors[2 * n][1] > 3.5, errors


def test_dpm_decoder_sampler_by_name_with_learned_variance_channels():
    process = DDPMProcess(T, "linear", learn_sigma=True)
    model = gaussian_eps("linear")

    def with_variance(x, t):  # the decoder's layout: epsilon channels, then variance channels the solver ignores
        eps = model(x, t)
        return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)

    z = _noise(8, 3, 4, 4)
    out = process.sampler("dpm40")(with_variance, z)
    chain = GaussianDiffusion.create(T, "linear", "dpm40", learn_sigma=False)
    torch.testing.assert_close(out, chain.dpm_solver_sample_loop(model, z))
    assert (out.double() - exact_ddpm_end(z, "linear")).abs().max() < 2e-2


# ---- Heun and Adams-Bashforth 2 (flow) ----

@pytest.mark.parametrize("method", [flow.sample_heun, flow.sample_adams])
def test_second_order_flow_samplers_converge_and_beat_euler(method):
    z = _noise(256, 4)
    exact = MU + S * z  # the linear path's ODE keeps the standard score: x1 = mu + s * x0
    errors = {}
    for calls in (4, 8, 16, 32):
        euler = (flow.sample_ode(gaussian_velocity, z, calls) - exact).abs().max().item()
        second = (method(gaussian_velocity, z, calls) - exact).abs().max().item()
        errors[calls] = (euler, second)
        assert second < (euler if calls == 4 else euler / 3), errors
    assert errors[32][1] < 1e-2, errors
    assert 1.7 < errors[16][0] / errors[32][0] < 2.3, errors
    assert errors[8][1] / errors[32][1] > 6, errors  # two halvings of the step: about 16x at second order


def test_adams_evaluates_where_euler_does_and_starts_with_an_euler_step():
    seen = {"euler": [], "adams": []}

    def recorder(name):
        def v(x, t):
            seen[name].append(float(t))
            return gaussian_velocity(x, t)
        return v

    z = _noise(8, 2)
    flow.sample_ode(recorder("euler"), z, 5)
    flow.sample_adams(recorder("adams"), z, 5)
    assert seen["adams"] == seen["euler"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])  # never the data end, t = 1
    torch.testing.assert_close(flow.sample_adams(gaussian_velocity, z, 1), flow.sample_ode(gaussian_velocity, z, 1))


def test_heun_counts_network_calls_and_needs_an_even_count():
    calls = []

    def v(x, t):
        calls.append(float(t))
        return gaussian_velocity(x, t)

    flow.sample_heun(v, _noise(4, 2), 6)
    assert calls == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match="even"):
        flow.sample_heun(v, _noise(4, 2), 5)


def test_flow_decoder_specs():
    assert flow.flow_steps("euler4") == ("euler", 4) and flow.flow_steps("heun6") == ("heun", 6)
    assert flow.flow_steps("adams3") == ("adams", 3)
    for bad in ("heun3", "euler0", "250", "dpm20"):
        with pytest.raises(ValueError, match="Euler, Heun or Adams"):
            flow.flow_steps(bad)
    process = decoder_process("flow")
    z = _noise(4, 3, 2, 2)

    def model(x, t):  # the decoder sees t * 1000, one per row
        assert t.shape == (x.shape[0],)
        return gaussian_velocity(x, t[:1].reshape(-1, 1, 1, 1) / 1000)

    torch.testing.assert_close(process.sampler("heun8")(model, z), flow.sample_heun(gaussian_velocity, z, 8))
    torch.testing.assert_close(process.sampler("adams5")(model, z), flow.sample_adams(gaussian_velocity, z, 5))


# ---- the head's samplers by name, and CFG ----

@pytest.mark.parametrize("objective,sampler,exact_of", [
    ("flow", "heun", lambda z: MU + S * z),
    ("flow", "adams", lambda z: MU + S * z),
    ("ddpm", "dpm", None),
])
def test_head_sampler_by_name(objective, sampler, exact_of):
    head = HeadSampler(objective, default_steps=40)
    calls = []
    model = gaussian_eps("cosine") if objective == "ddpm" else gaussian_velocity

    def model_fn(x, t):
        calls.append(t)
        return torch.cat([model(x, t), torch.zeros_like(x)], dim=1) if objective == "ddpm" else model(x, t)

    out = head.sample(model_fn, 128, 4, "cpu", generator=torch.Generator().manual_seed(0), sampler=sampler)
    z = _noise(128, 4)  # the sampler's first draw is the initial noise
    exact = exact_of(z) if exact_of else exact_ddpm_end(z, "cosine")
    assert len(calls) == 40
    assert (out.double() - exact).abs().max() < 1e-2
    other = "dpm" if objective == "flow" else "heun"
    with pytest.raises(ValueError, match=f"does not fit a {objective} head"):
        head.sample(model_fn, 2, 4, "cpu", sampler=other)


def test_classifier_free_guidance_takes_a_tensor_scale():
    out = torch.randn(6, 5, 2)
    a = classifier_free_guidance(out, 2.5, 3)
    b = classifier_free_guidance(out, torch.tensor(2.5), 3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, :3], out[3:, :3] + 2.5 * (out[:3, :3] - out[3:, :3]))
    assert torch.equal(a[:, 3:], out[:3, 3:])
    assert math.isclose(float(classifier_free_guidance(out, 1.0, 3)[0, 0, 0]), float(out[0, 0, 0]), rel_tol=1e-6)
