"""The MAR-style diffusion head ("DiffLoss"): an MLP that denoises one continuous token given the transformer output.

Time enters through adaLN (shift/scale/gate); the condition is either concatenated with the modulated
activations in every block ("concat", the official GPT-L setting) or added to the time embedding ("adaln").
Parameter names follow the official checkpoint (`diffloss.net.*`).
"""
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..common.noise import SampleNoise
from ..diffusion import flow
from ..diffusion.gaussian import GaussianDiffusion
from ..diffusion.sampling import HeadSampler, HeadSamplerName, guided_denoiser
from .layers import FinalLayer, TimestepEmbedder

CondMethod = Literal["concat", "adaln"]
Objective = Literal["flow", "ddpm"]


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int, cond_method: CondMethod):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        mlp_in = 2 * width if cond_method == "concat" else width
        self.mlp = nn.Sequential(nn.Linear(mlp_in, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x, mod, cond: Optional[torch.Tensor]):
        # mod may have a single row shared by all of x (one timestep for the whole batch while sampling).
        shift, scale, gate = self.adaLN_modulation(mod).chunk(3, dim=-1)
        h = _modulate(self.in_ln(x), shift, scale)
        if cond is not None:
            h = torch.cat([h, cond], dim=-1)
        return x + gate * self.mlp(h)


class MLPAdaLN(nn.Module):
    def __init__(self, in_channels: int, width: int, out_channels: int, cond_dim: int, depth: int,
                 cond_method: CondMethod = "concat"):
        super().__init__()
        if cond_method not in ("concat", "adaln"):
            raise ValueError(f"head cond method {cond_method!r} is not supported; choose 'concat' or 'adaln'")
        self.cond_method = cond_method
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width, cond_method) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels, concat_dim=width if cond_method == "concat" else 0)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for layer in [*self.res_blocks, self.final_layer]:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, cond):
        """x (N, C), t (N,) or (1,) (shared), cond (N, cond_dim) -> (N, out_channels)."""
        return self.denoise(x, t, self.cond_embed(cond))

    def denoise(self, x, t, cond_emb):
        """As forward, with the condition already embedded (it is fixed over a sampling chain)."""
        t_emb = self.time_embed(t)
        if self.cond_method == "concat":
            mod, cond = t_emb, cond_emb
        else:
            mod, cond = t_emb + cond_emb, None
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        for block in self.res_blocks:
            h = block(h, mod, cond)
        return self.final_layer(h, mod, cond)


class DiffusionHead(nn.Module):
    """Training loss and sampler of one token per row, conditioned on a transformer output per row."""

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1536, depth: int = 12,
                 cond_method: CondMethod = "concat", objective: Objective = "flow", sample_steps: int = 250,
                 ddpm_schedule: str = "cosine", ddpm_timesteps: int = 1000):
        super().__init__()
        if objective not in ("flow", "ddpm"):
            raise ValueError(f"head objective {objective!r} is not supported; choose 'flow' or 'ddpm'")
        self.token_dim = token_dim
        self.objective = objective
        self.sample_steps = sample_steps
        self.ddpm_schedule = ddpm_schedule
        self.ddpm_timesteps = ddpm_timesteps
        # DDPM learns the variance too (2x channels); flow predicts only the velocity.
        out_channels = token_dim if objective == "flow" else 2 * token_dim
        self.net = MLPAdaLN(token_dim, width, out_channels, cond_dim, depth, cond_method)
        if objective == "ddpm":
            self.train_diffusion = GaussianDiffusion.create(ddpm_timesteps, ddpm_schedule, "", learn_sigma=True)
        self.sampling = HeadSampler(objective, sample_steps, ddpm_schedule, ddpm_timesteps)

    def training_draws(self, rng: SampleNoise, batch: int, rows_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample training times (batch, rows) and noise (batch, rows, token_dim) for the rows of each sample."""
        if self.objective == "flow":
            t = rng.rand(batch, rows_per_sample)
        else:
            t = rng.randint(0, self.train_diffusion.num_timesteps, batch, rows_per_sample)
        return t, rng.randn(batch, rows_per_sample, self.token_dim)

    def loss(self, target: torch.Tensor, cond: torch.Tensor, t: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-row loss (N,) for tokens target (N, token_dim) given cond (N, cond_dim); t (N,) and noise
        (N, token_dim) are drawn from torch's generator when not given."""
        def model_fn(x, tt):
            return self.net(x, tt, cond)

        if self.objective == "flow":
            return flow.training_loss(model_fn, target, t, noise)
        return self.train_diffusion.training_losses(model_fn, target, t, noise)["loss"]

    def _model_fn(self, cond: torch.Tensor, guidance: Optional[float], naive: bool):
        """(x, t) -> network output for the B sampled rows, guided when a guidance scale is given.

        All rows share one timestep; the fast path embeds the condition once per chain and the timestep once per
        step, the naive path (the reference's cost) redoes both for every row at every call.
        """
        if naive:
            def call(x, t):
                return self.net(x, t.reshape(-1)[:1].expand(x.shape[0]), cond)
        else:
            cond_emb = self.net.cond_embed(cond)

            def call(x, t):
                return self.net.denoise(x, t.reshape(-1)[:1], cond_emb)

        if guidance is None:
            return call
        return guided_denoiser(call, guidance, self.token_dim)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, guidance: Optional[float] = None, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
               sampler: HeadSamplerName = "sde") -> torch.Tensor:
        """Sample one token per row -> (B, token_dim) float32.

        guidance None: cond is (B, cond_dim). guidance a float: cond is (2B, cond_dim), conditional rows then
        unconditional ones, and the output is guided as uncond + guidance * (cond - uncond) (classifier-free).
        sampler: see diffusion.sampling.HeadSampler ("sde", "sde_naive", "ode"; "heun", "adams" for flow heads;
        "dpm" for ddpm heads).
        """
        self.sampling.check(sampler)
        rows = cond.shape[0] if guidance is None else cond.shape[0] // 2
        model_fn = self._model_fn(cond, guidance, naive=sampler == "sde_naive")
        return self.sampling.sample(model_fn, rows, self.token_dim, cond.device, temperature, generator, steps, sampler)
