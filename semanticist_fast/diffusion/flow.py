"""Flow matching on the linear (SiT) path, with a velocity-predicting network.

Path: x_t = t * x1 + (1 - t) * x0, with x1 the data, x0 ~ N(0, I) and t in [0, 1] (t = 1 is data).
The network predicts the velocity v(x, t) = E[x1 - x0 | x_t = x].

Score from velocity (one network call gives both): from x_t = t x1 + (1 - t) x0 and v = x1 - x0,
    E[x0 | x_t] = x_t - t v,   so   score(x, t) = -E[x0 | x_t] / (1 - t) = (t v - x) / (1 - t).
The reverse-time SDE that keeps the path's marginals, with diffusion coefficient w(t),
    dx = [v + w(t) score] dt + sqrt(2 w(t)) dW,
and the reference's choice w(t) = 1 - t ("sigma" form) cancels the division:
    drift = v + (t v - x) = (1 + t) v - x,   noise scale = sqrt(2 (1 - t) dt).
The reference evaluates the network once for the velocity and again for the score at the same (x, t);
`naive=True` reproduces that (two calls, score via its general variance formula) for benchmarks.

`velocity_fn(x, t)` is called with x (N, C) and t a (1,) float tensor shared by all rows.

Two second-order integrators of the same ODE, whose error falls as 1/calls^2 where Euler's falls as 1/calls:
- Heun (`sample_heun`): each step averages the velocity at its start and at the Euler prediction of its end
  (two calls a step). It evaluates the network at t = 1, the data end, where a decoder trained on noise-heavy
  times has seen almost nothing (the tiny tokenizer: benchmarks/sampler_steps.py).
- Adams-Bashforth 2 (`sample_adams`), the flow analogue of DPM-Solver++(2M): one call a step, at the very times
  Euler evaluates, and the step extrapolates the velocity linearly from the last two calls,
      x_{i+1} = x_i + h_i [(1 + h_i / (2 h_{i-1})) v_i - h_i / (2 h_{i-1}) v_{i-1}]   (the first step is Euler's).

`RectifiedFlow` packages the same path for an image decoder (the tokenizer's DiT): logit-normal training times,
a timestep scale for the network, and few-step Euler or Heun decoding.
"""
import re
from typing import Callable, Optional

import torch

from ..common.noise import SampleNoise, noise_or_local
from ..common.stopping import check_stop

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def training_loss(velocity_fn: VelocityFn, x1: torch.Tensor,
                  t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row MSE between the predicted and the true velocity x1 - x0, with t ~ U[0, 1] per row.

    Here velocity_fn gets a per-row t of shape (N,).
    """
    if t is None:
        t = torch.rand(x1.shape[0], device=x1.device)
    if noise is None:
        noise = torch.randn_like(x1)
    tb = t.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    x_t = tb * x1 + (1 - tb) * noise
    target = x1 - noise
    pred = velocity_fn(x_t, t)
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x1.ndim)))


def sde_drift(x: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Drift of the reverse SDE with w(t) = 1 - t, from one velocity prediction (see module docstring)."""
    return (1 + t) * velocity - x


def _naive_sde_drift(x: torch.Tensor, t: torch.Tensor, velocity_fn: VelocityFn) -> torch.Tensor:
    """The reference's drift: one call for the velocity, another for the score, in the general-path form."""
    velocity = velocity_fn(x, t)
    sigma = 1 - t
    # General linear-path score: (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma), alpha = t, sigma = 1 - t.
    score = (t * velocity_fn(x, t) - x) / (sigma ** 2 + t * sigma)
    return velocity + sigma * score


def sample_sde(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int = 250, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, last_step_size: float = 0.04,
               naive: bool = False) -> torch.Tensor:
    """Euler-Maruyama from x0 = noise (t = 0) up to t = 1 - last_step_size, then one noise-free mean step to t = 1.

    `steps` counts drift evaluations, as the reference's num_steps does: a grid of `steps` points on
    [0, 1 - last_step_size], Euler-Maruyama over its first steps - 1 points, the mean step at the last one.
    Temperature scales the injected noise only (not x0).
    """
    if steps < 2:
        raise ValueError(f"the SDE sampler needs at least 2 steps, got {steps}")
    grid = torch.linspace(0.0, 1.0 - last_step_size, steps, device=noise.device)
    dt = grid[1] - grid[0]
    noise_scale = torch.sqrt(2 * (1 - grid) * dt) * temperature
    x = noise
    for i in range(steps):
        t = grid[i:i + 1]
        drift = _naive_sde_drift(x, t, velocity_fn) if naive else sde_drift(x, t, velocity_fn(x, t))
        if i < steps - 1:
            z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = x + drift * dt + noise_scale[i] * z
        else:
            x = x + drift * last_step_size
    return x


def sample_ode(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int = 250) -> torch.Tensor:
    """Deterministic Euler integration of dx/dt = v(x, t) from t = 0 (noise) to t = 1, `steps` evaluations."""
    if steps < 1:
        raise ValueError(f"the ODE sampler needs at least 1 step, got {steps}")
    grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)
    x = noise
    for i in range(steps):
        x = x + velocity_fn(x, grid[i:i + 1]) * (grid[i + 1] - grid[i])
    return x


def sample_heun(velocity_fn: VelocityFn, noise: torch.Tensor, evaluations: int = 4) -> torch.Tensor:
    """Heun's method for dx/dt = v(x, t) from t = 0 (noise) to t = 1 with `evaluations` network calls (even:
    evaluations / 2 steps of two calls; the velocity at t = 1 is defined on this path, so the last step is Heun too).
    """
    if evaluations < 2 or evaluations % 2:
        raise ValueError(f"Heun's method makes two network calls per step: evaluations must be even and >= 2, "
                         f"got {evaluations}")
    grid = torch.linspace(0.0, 1.0, evaluations // 2 + 1, device=noise.device)
    x = noise
    for i in range(evaluations // 2):
        t0, t1 = grid[i:i + 1], grid[i + 1:i + 2]
        h = t1 - t0
        slope = velocity_fn(x, t0)
        end_slope = velocity_fn(x + slope * h, t1)
        x = x + (slope + end_slope) * (h / 2)
    return x


def sample_adams(velocity_fn: VelocityFn, noise: torch.Tensor, evaluations: int = 4) -> torch.Tensor:
    """Second-order Adams-Bashforth for dx/dt = v(x, t) from t = 0 to 1: `evaluations` calls at Euler's times."""
    if evaluations < 1:
        raise ValueError(f"the ODE sampler needs at least 1 step, got {evaluations}")
    grid = torch.linspace(0.0, 1.0, evaluations + 1, device=noise.device)
    x, previous, previous_h = noise, None, None
    for i in range(evaluations):
        h = grid[i + 1] - grid[i]
        slope = velocity_fn(x, grid[i:i + 1])
        if previous is None:
            x = x + slope * h
        else:
            ratio = h / (2 * previous_h)
            x = x + ((1 + ratio) * slope - ratio * previous) * h
        previous, previous_h = slope, h
    return x


FLOW_DECODERS = {"euler": sample_ode, "heun": sample_heun, "adams": sample_adams}


def flow_steps(spec: str) -> tuple[str, int]:
    """"euler4" -> ("euler", 4), "heun4", "adams4": a flow decoder's sampler and its network calls."""
    match = re.fullmatch(r"(euler|heun|adams)(\d+)", str(spec))
    if match is None or int(match.group(2)) < 1 or (match.group(1) == "heun" and int(match.group(2)) % 2):
        raise ValueError(f"sample steps {spec!r}: a flow decoder samples with Euler, Heun or Adams-Bashforth steps "
                         f"given as network calls, e.g. 'euler4', 'adams4' or 'heun4' (Heun: an even count, two calls "
                         f"a step)")
    return match.group(1), int(match.group(2))


class RectifiedFlow:
    """Flow matching for a denoiser network that takes (x_t, timesteps (B,)).

    Training times are logit-normal: t = sigmoid(N(t_mean, t_std)), with t = 0 pure noise and t = 1 the data, so a
    negative t_mean puts the training where the noise is heavy and the condition decides the output. The network
    sees t * time_scale (1000: the range of DDPM timesteps, so the DiT's sinusoidal embedding is used alike).
    One Euler step from pure noise gives the network's estimate of E[data | condition]; more steps draw sharper
    samples from the learned distribution. Specs: "eulerN", "heunN", "adamsN": N network calls.
    """

    def __init__(self, t_mean: float = 0.0, t_std: float = 1.0, time_scale: float = 1000.0):
        self.t_mean, self.t_std, self.time_scale = t_mean, t_std, time_scale

    def to(self, device):
        return self  # no tables to move

    def training_losses(self, model_fn, x1: torch.Tensor, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None, rng: Optional[SampleNoise] = None) -> dict[str, torch.Tensor]:
        """Per-sample {"loss", "mse"} (the same here: velocity MSE). t and noise not given are drawn from rng."""
        rng = noise_or_local(rng, x1.device)
        if t is None:
            t = torch.sigmoid(self.t_mean + self.t_std * rng.randn(x1.shape[0]))
        if noise is None:
            noise = rng.randn(*x1.shape).to(x1.dtype)
        mse = training_loss(lambda x, tt: model_fn(x, tt * self.time_scale), x1, t, noise)
        return {"loss": mse, "mse": mse}

    def sampler(self, spec: str):
        method, evaluations = flow_steps(spec)
        integrate = FLOW_DECODERS[method]

        def sample(model_fn, noise, generator=None, progress: bool = False):
            bar = None
            if progress:  # one tick per network call, as the DDPM loops tick per step
                from tqdm.auto import tqdm
                bar = tqdm(total=evaluations, desc=spec, leave=False)

            def velocity(x, t):
                check_stop()  # a caller's deadline or cancellation ends the loop here, between network calls
                v = model_fn(x, (t * self.time_scale).expand(x.shape[0])).float()
                if bar is not None:
                    bar.update()
                return v

            try:
                return integrate(velocity, noise, evaluations)
            finally:
                if bar is not None:
                    bar.close()

        return sample
