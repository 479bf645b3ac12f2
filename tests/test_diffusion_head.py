"""The MAR-style diffusion head, flow matching and its samplers."""
import math

import pytest
import torch
import torch.nn.functional as F

from semanticist_fast.diffusion import flow
from semanticist_fast.models.diffusion_head import DiffusionHead, MLPAdaLN

from helpers import layout_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def read_layout() -> dict:
    return layout_shapes("gpt_GPT-L.tsv")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Replace the zero init with random weights so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))


def reference_mlp(net: MLPAdaLN, x, t, c):
    """Plain re-derivation of SimpleMLPAdaLN from its parameters, one row at a time semantics (t per row)."""
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    te = net.time_embed.mlp
    t_emb = F.linear(F.silu(F.linear(t_freq, te[0].weight, te[0].bias)), te[2].weight, te[2].bias)
    c_emb = F.linear(c, net.cond_embed.weight, net.cond_embed.bias)
    concat = net.cond_method == "concat"
    mod = t_emb if concat else t_emb + c_emb
    h = F.linear(x, net.input_proj.weight, net.input_proj.bias)
    for blk in net.res_blocks:
        ada = F.linear(F.silu(mod), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
        shift, scale, gate = ada.chunk(3, dim=-1)
        y = F.layer_norm(h, (h.shape[-1],), blk.in_ln.weight, blk.in_ln.bias, eps=1e-6) * (1 + scale) + shift
        if concat:
            y = torch.cat([y, c_emb], dim=-1)
        y = F.linear(F.silu(F.linear(y, blk.mlp[0].weight, blk.mlp[0].bias)), blk.mlp[2].weight, blk.mlp[2].bias)
        h = h + gate * y
    fl = net.final_layer
    ada = F.linear(F.silu(mod), fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias)
    shift, scale = ada.chunk(2, dim=-1)
    y = F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale) + shift
    if concat:
        y = torch.cat([y, c_emb], dim=-1)
    return F.linear(y, fl.linear.weight, fl.linear.bias)


def test_head_layout_matches_official_gpt_l():
    official = {k[len("diffloss."):]: v for k, v in read_layout().items() if k.startswith("diffloss.")}
    with torch.device("meta"):
        head = DiffusionHead(16, 1024, width=1536, depth=12, cond_method="concat", objective="flow")
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert ours == official
    assert ours["net.res_blocks.0.mlp.0.weight"] == (1536, 3072)
    assert ours["net.final_layer.linear.weight"] == (16, 3072)


def test_head_layout_adaln_and_ddpm():
    head = DiffusionHead(16, 40, width=24, depth=3, cond_method="adaln", objective="ddpm")
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["net.res_blocks.2.mlp.0.weight"] == (24, 24)
    assert shapes["net.final_layer.linear.weight"] == (32, 24)  # learned sigma doubles the channels
    assert shapes["net.final_layer.adaLN_modulation.1.weight"] == (48, 24)
    assert not any("diffusion" in k for k in shapes)  # schedule tables stay out of the state dict


def test_zero_init_outputs_zero():
    head = DiffusionHead(16, 40, width=24, depth=2)
    out = head.net(torch.randn(5, 16), torch.rand(5), torch.randn(5, 40))
    assert torch.equal(out, torch.zeros(5, 16))
    for blk in head.net.res_blocks:
        assert torch.count_nonzero(blk.adaLN_modulation[1].weight) == 0
    assert torch.count_nonzero(head.net.time_embed.mlp[0].weight) > 0


@pytest.mark.parametrize("cond_method", ["concat", "adaln"])
def test_mlp_matches_plain_reference(cond_method):
    torch.manual_seed(0)
    net = MLPAdaLN(in_channels=7, width=20, out_channels=14, cond_dim=13, depth=3, cond_method=cond_method)
    randomize(net)
    x, t, c = torch.randn(11, 7), torch.rand(11) * 1000, torch.randn(11, 13)
    torch.testing.assert_close(net(x, t, c), reference_mlp(net, x, t, c), rtol=1e-5, atol=1e-5)
    # One timestep shared by all rows (the sampling fast path) equals that timestep repeated per row.
    t1 = torch.tensor([0.37])
    torch.testing.assert_close(net(x, t1, c), reference_mlp(net, x, t1.expand(11), c), rtol=1e-5, atol=1e-5)


def test_flow_training_loss_formula():
    x1, noise, t = torch.randn(9, 5), torch.randn(9, 5), torch.rand(9)
    seen = {}

    def velocity_fn(x, tt):
        seen["x"], seen["t"] = x, tt
        return x * 0.5

    loss = flow.training_loss(velocity_fn, x1, t, noise)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * noise
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(loss, ((0.5 * x_t - (x1 - noise)) ** 2).mean(1))


def gaussian_velocity(mu: float, s: float):
    """Exact velocity of the linear path for data N(mu, s^2) per dim: E[x1 - x0 | x_t = x]."""
    def v(x, t):
        return mu + (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2) * (x - t * mu)
    return v


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_flow_samplers_recover_known_distribution(sampler):
    mu, s = 1.5, 0.5
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 8, generator=g)
    if sampler == "sde":
        x = flow.sample_sde(gaussian_velocity(mu, s), noise, steps=100, generator=g)
    else:
        x = flow.sample_ode(gaussian_velocity(mu, s), noise, steps=100)
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) < 0.03 * s


def test_sde_single_call_equals_naive_two_calls():
    calls = {"n": 0}
    base = gaussian_velocity(0.3, 0.8)

    def v(x, t):
        calls["n"] += 1
        return base(x, t)

    noise = torch.randn(64, 6)
    fast = flow.sample_sde(v, noise, steps=30, temperature=0.9, generator=torch.Generator().manual_seed(3))
    assert calls["n"] == 30
    naive = flow.sample_sde(v, noise, steps=30, temperature=0.9, generator=torch.Generator().manual_seed(3), naive=True)
    assert calls["n"] == 30 + 60
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


def test_sde_temperature_scales_injected_noise_only():
    v = gaussian_velocity(0.0, 1.0)
    noise = torch.randn(16, 4)
    a = flow.sample_sde(v, noise, steps=20, temperature=0.0, generator=torch.Generator().manual_seed(0))
    b = flow.sample_sde(v, noise, steps=20, temperature=0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    c = flow.sample_sde(v, noise, steps=20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_head_sampling_fast_equals_naive_with_cfg(objective):
    torch.manual_seed(0)
    head = DiffusionHead(16, 12, width=24, depth=2, objective=objective, sample_steps=12).eval()
    randomize(head.net, seed=1)
    head.net.final_layer.linear.weight.data *= 0.1  # keep the chain tame with random weights
    cond = torch.randn(6, 12)  # 3 conditional rows, then 3 unconditional
    fast = head.sample(cond, guidance=2.5, generator=torch.Generator().manual_seed(7), sampler="sde")
    naive = head.sample(cond, guidance=2.5, generator=torch.Generator().manual_seed(7), sampler="sde_naive")
    assert fast.shape == (3, 16) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_head_ode_is_deterministic(objective):
    head = DiffusionHead(16, 12, width=24, depth=2, objective=objective, sample_steps=10).eval()
    randomize(head.net, seed=2)
    head.net.final_layer.linear.weight.data *= 0.1
    cond = torch.randn(4, 12)
    a = head.sample(cond, generator=torch.Generator().manual_seed(0), sampler="ode")
    b = head.sample(cond, generator=torch.Generator().manual_seed(0), sampler="ode")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_guidance_combines_cond_and_uncond(objective):
    head = DiffusionHead(5, 9, width=16, depth=2, objective=objective)
    randomize(head.net, seed=3)
    cond = torch.randn(8, 9)
    x, t = torch.randn(4, 5), torch.tensor([0.25]) if objective == "flow" else torch.full((4,), 17)
    guided = head._model_fn(cond, 3.0, naive=False)(x, t)
    t_rows = t.reshape(-1)[:1].expand(8)
    out = head.net(torch.cat([x, x]), t_rows, cond)
    c, u = out[:4], out[4:]
    torch.testing.assert_close(guided[:, :5], u[:, :5] + 3.0 * (c[:, :5] - u[:, :5]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, 5:], c[:, 5:])  # learned variance comes from the conditional half


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
@pytest.mark.parametrize("cond_method", ["concat", "adaln"])
def test_head_loss_falls_on_fixed_batch(objective, cond_method):
    torch.manual_seed(0)
    head = DiffusionHead(16, 32, width=64, depth=2, cond_method=cond_method, objective=objective)
    target = torch.randn(32, 16)
    cond = torch.randn(32, 32)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = head.loss(target, cond)
        assert loss.shape == (32,)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.6 * first, (first, last)
