"""Sampling by name, shared by the eager models and the compiled runtime (semanticist_fast/export/runtime.py).

Both draw their noise through the functions here, in the same order, so an exported sampler given the same
generator reproduces the eager one. Nothing here knows a network: every sampler takes a `model_fn(x, t)`.

- `HeadSampler`: one token per row for the AR model's diffusion head (flow: SDE, Euler, Heun and
  Adams-Bashforth 2 ODE; DDPM: ancestral, DDIM, DPM-Solver++(2M)).
- `decoder_process`: the tokenizer decoder's process (training losses, and samplers by spec such as "250",
  "ddim25", "dpm20", "euler4", "heun4", "adams4").
- `classifier_free_guidance`, `guidance_at`: how the conditional and unconditional halves of a CFG batch
  combine, and the class-guidance scale of each AR token.
"""
from typing import Callable, Literal, Optional, Union

import torch

from ..common.stopping import stoppable
from . import flow
from .gaussian import DDPMProcess, GaussianDiffusion

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HeadSamplerName = Literal["sde", "sde_naive", "ode", "heun", "adams", "dpm"]
HEAD_SAMPLERS = {"flow": ("sde", "sde_naive", "ode", "heun", "adams"), "ddpm": ("sde", "sde_naive", "ode", "dpm")}


def classifier_free_guidance(out: torch.Tensor, guidance: Union[float, torch.Tensor], channels: int) -> torch.Tensor:
    """out: conditional rows, then as many unconditional rows, channels along dim 1. The first `channels` (the
    predicted epsilon or velocity) are guided as uncond + guidance * (cond - uncond); the rest (a learned
    variance) come from the conditional half. guidance may be a 0-d tensor (an exported step takes it as input).
    """
    half = out.shape[0] // 2  # slices, not chunk(2): chunk puts a guard on a dynamic batch that export rejects
    cond, uncond = out[:half], out[half:]
    guided = uncond[:, :channels] + guidance * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def guided_denoiser(call: ModelFn, guidance: Union[float, torch.Tensor], channels: int) -> ModelFn:
    """call(x (2B, C), t) on a CFG batch (conditional rows, then unconditional) -> a guided (x (B, C), t) -> (B, out).
    Both halves see the same x (shared noise)."""
    def guided(x, t):
        return classifier_free_guidance(call(torch.cat([x, x]), t).float(), guidance, channels)

    return guided


def guidance_at(guidance: float, k: int, num_tokens: int, schedule: Literal["linear", "constant"] = "linear") -> float:
    """Guidance scale for token k (0-based): "linear" is 1 + (g - 1)(k + 1) / num_tokens, reaching g at the end."""
    if schedule == "linear":
        return 1.0 + (guidance - 1.0) * (k + 1) / num_tokens
    if schedule == "constant":
        return guidance
    raise ValueError(f"guidance schedule {schedule!r} is not supported; choose 'linear' or 'constant'")


class HeadSampler:
    """The diffusion head's samplers, one token per row; the DDPM chains are built once per (steps, device).

    sampler: "sde" (flow: Euler-Maruyama, one call per step; ddpm: ancestral), "sde_naive" (the reference's two
    calls per SDE step, for benchmarks), "ode" (flow: Euler; ddpm: DDIM eta=0), "heun" and "adams" (flow: Heun's
    and the Adams-Bashforth second-order ODE methods), "dpm" (ddpm: DPM-Solver++(2M)); `steps` counts network
    calls for every sampler. Temperature
    scales the SDE / ancestral noise; the deterministic samplers have no other randomness, so there it scales
    the initial noise.
    """

    def __init__(self, objective: Literal["flow", "ddpm"], default_steps: int, ddpm_schedule: str = "cosine",
                 ddpm_timesteps: int = 1000):
        if objective not in HEAD_SAMPLERS:
            raise ValueError(f"head objective {objective!r} is not supported; choose 'flow' or 'ddpm'")
        self.objective, self.default_steps = objective, default_steps
        self.ddpm_schedule, self.ddpm_timesteps = ddpm_schedule, ddpm_timesteps
        self._chains: dict = {}

    def check(self, sampler: str) -> None:
        allowed = HEAD_SAMPLERS[self.objective]
        if sampler not in allowed:
            raise ValueError(f"head sampler {sampler!r} does not fit a {self.objective} head; choose one of "
                             f"{', '.join(map(repr, allowed))}")

    def _chain(self, steps: int, sampler: str, device) -> GaussianDiffusion:
        respacing = f"dpm{steps}" if sampler == "dpm" else str(steps)
        key = (respacing, str(device))
        if key not in self._chains:
            self._chains[key] = GaussianDiffusion.create(self.ddpm_timesteps, self.ddpm_schedule, respacing,
                                                         learn_sigma=True).to(device)
        return self._chains[key]

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, rows: int, token_dim: int, device, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
               sampler: HeadSamplerName = "sde") -> torch.Tensor:
        """(rows, token_dim) float32 tokens; model_fn(x (rows, token_dim), t (1,)) is the (guided) network."""
        self.check(sampler)
        steps = steps or self.default_steps
        model_fn = stoppable(model_fn)  # a caller's deadline or cancellation ends the loop between network calls
        noise = torch.randn(rows, token_dim, device=device, generator=generator)
        if self.objective == "flow":
            if sampler == "ode":
                return flow.sample_ode(model_fn, noise * temperature, steps)
            if sampler in ("heun", "adams"):
                return flow.FLOW_DECODERS[sampler](model_fn, noise * temperature, steps)
            return flow.sample_sde(model_fn, noise, steps, temperature, generator, naive=sampler == "sde_naive")
        chain = self._chain(steps, sampler, device)
        if sampler == "ode":
            return chain.ddim_sample_loop(model_fn, noise * temperature, eta=0.0)
        if sampler == "dpm":
            return chain.dpm_solver_sample_loop(model_fn, noise * temperature)
        return chain.p_sample_loop(model_fn, noise, generator=generator, temperature=temperature)


def decoder_process(objective: Literal["ddpm", "flow"], num_timesteps: int = 1000, noise_schedule: str = "linear",
                    learn_sigma: bool = True, flow_t_mean: float = 0.0, flow_t_std: float = 1.0):
    """The decoder's diffusion process: `.training_losses(model_fn, latents)` and `.sampler(spec)`."""
    if objective == "flow":
        return flow.RectifiedFlow(flow_t_mean, flow_t_std)
    return DDPMProcess(num_timesteps, noise_schedule, learn_sigma)
