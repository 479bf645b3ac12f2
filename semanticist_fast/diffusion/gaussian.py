"""Gaussian diffusion (DDPM) with epsilon prediction and learned-range variance, as in ADM / DiT.

The schedule lives in non-persistent buffers, so `.to(device)` moves it once and no call copies host tensors.
A respaced chain is the same class built from the kept timesteps: `timestep_map` translates its indices back
to the timesteps the network was trained on.

DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models") integrates the probability-flow ODE in the data prediction x0(x_t) = (x_t - sigma_t eps) / alpha_t,
with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t).
Exactly solved for the linear part, a step from s to t (h = lambda_t - lambda_s > 0) is
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D,
where D = x0(x_s) gives the first-order method (DDIM, exactly), and the multistep second-order D extrapolates
with the previous step's prediction: r = h_prev / h, D = (1 + 1/(2r)) x0(x_s) - 1/(2r) x0(x_prev).
One network call per step; the first step has no history and is first order.
"""
import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..common.noise import SampleNoise, noise_or_local
from ..common.stopping import stoppable
from .schedules import make_betas, space_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data discretised to 256 bins in [-1, 1] (the t=0 decoder term of the VLB)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion(nn.Module):
    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: Optional[torch.Tensor] = None):
        super().__init__()
        betas = betas.to(torch.float64)
        self.num_timesteps = betas.shape[0]
        self.learn_sigma = learn_sigma
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t=0; ADM clips its log to the t=1 value.
        posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "log_betas": torch.log(betas),
            # The fixed "large" variance: beta_t, with the posterior's at t=0.
            "log_variance_fixed": torch.log(torch.cat([posterior_variance[1:2], betas[1:]])),
        }
        for name, value in tables.items():
            # float32 on device: the gathers stay cheap and the tables come out identical to ADM's numpy->float32 path.
            self.register_buffer(name, value.float(), persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.register_buffer("timestep_map", timestep_map.long(), persistent=False)

    @classmethod
    def create(cls, num_timesteps: int = 1000, schedule: str = "linear", respacing: str = "", learn_sigma: bool = True):
        """The chain the network was trained on, optionally respaced ("250", "ddim25")."""
        base_betas = make_betas(schedule, num_timesteps)
        kept = space_timesteps(num_timesteps, respacing) if respacing else list(range(num_timesteps))
        if kept == list(range(num_timesteps)):
            return cls(base_betas, learn_sigma=learn_sigma)
        alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
        new_betas, last = [], 1.0
        for i in kept:
            new_betas.append(1 - alphas_cumprod[i].item() / last)
            last = alphas_cumprod[i].item()
        return cls(torch.tensor(new_betas, dtype=torch.float64), learn_sigma=learn_sigma, timestep_map=torch.tensor(kept))

    @staticmethod
    def _extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return table[t].reshape(-1, *([1] * (ndim - 1)))

    # -- forward process ------------------------------------------------------------------------------------------
    def q_sample(self, x_start, t, noise):
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = self._extract(self.posterior_mean_coef1, t, n) * x_start + self._extract(self.posterior_mean_coef2, t, n) * x_t
        return mean, self._extract(self.posterior_variance, t, n), self._extract(self.posterior_log_variance_clipped, t, n)

    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - self._extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, n)

    # -- reverse process --------------------------------------------------------------------------------------------
    def split_output(self, model_output, x_t):
        channels = x_t.shape[1]
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:2 * channels]
        return model_output, None

    def p_mean_variance(self, model_output, x_t, t):
        eps, var_values = self.split_output(model_output, x_t)
        n = x_t.ndim
        if var_values is not None:
            # Learned range: interpolate the log-variance between the posterior's and beta's, as in improved DDPM.
            min_log = self._extract(self.posterior_log_variance_clipped, t, n)
            max_log = self._extract(self.log_betas, t, n)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            log_variance = self._extract(self.log_variance_fixed, t, n).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart, eps

    def model_timesteps(self, t):
        return self.timestep_map[t]

    def training_losses(self, model_fn: ModelFn, x_start, t=None, noise=None, rng: Optional[SampleNoise] = None):
        """MSE on epsilon plus the VLB term on the learned variance, with the mean detached (ADM's hybrid loss).

        t: (B,) timesteps, uniform over the chain when not given; t and noise not given are drawn from rng
        (common/noise.py). Returns per-sample tensors: {"loss", "mse", "vb"}.
        """
        rng = noise_or_local(rng, x_start.device)
        if t is None:
            t = rng.randint(0, self.num_timesteps, x_start.shape[0])
        if noise is None:
            noise = rng.randn(*x_start.shape).to(x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t))
        eps, var_values = self.split_output(model_output, x_t)
        mse = _mean_flat((noise - eps.float()) ** 2)
        terms = {"mse": mse}
        if var_values is not None:
            frozen = torch.cat([eps.detach(), var_values], dim=1).float()
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def p_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, generator: Optional[torch.Generator] = None,
                      progress: bool = False, temperature: float = 1.0):
        """Ancestral sampling from x_T = noise with the learned variance, no clipping."""
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            mean, log_var, _, _ = self.p_mean_variance(model_fn(x, self.model_timesteps(t)).float(), x, t)
            if i > 0:
                z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
                x = mean + torch.exp(0.5 * log_var) * z * temperature
            else:
                x = mean
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, eta: float = 0.0,
                         generator: Optional[torch.Generator] = None, progress: bool = False):
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="ddim", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps, _ = self.split_output(model_fn(x, self.model_timesteps(t)).float(), x)  # DDIM needs no variance
            pred_xstart = self.predict_xstart_from_eps(x, t, eps)
            alpha_bar = self.alphas_cumprod[i]
            alpha_bar_prev = self.alphas_cumprod_prev[i]
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            x = pred_xstart * alpha_bar_prev.sqrt() + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
            if i > 0 and eta > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        return x

    @torch.no_grad()
    def dpm_solver_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, order: int = 2,
                               progress: bool = False):
        """DPM-Solver++ (multistep, `order` 1 or 2) over this chain's timesteps, one network call each; the last
        call, at the chain's cleanest timestep, returns its data prediction (as DDIM and the ancestral sampler do).
        """
        if order not in (1, 2):
            raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order}")
        # Coefficient tables once, on the chain's device: the loop then reads them without a host sync.
        alpha = self.sqrt_alphas_cumprod
        sigma = self.sqrt_one_minus_alphas_cumprod
        lam = torch.log(alpha) - torch.log(sigma)
        x, previous, previous_h = noise, None, None
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="dpm-solver++", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps, _ = self.split_output(model_fn(x, self.model_timesteps(t)).float(), x)
            x0 = self.predict_xstart_from_eps(x, t, eps)
            if i == 0:
                return x0
            h = lam[i - 1] - lam[i]
            if order == 1 or previous is None:
                d = x0
            else:
                r = previous_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
            x = (sigma[i - 1] / sigma[i]) * x + alpha[i - 1] * (1 - torch.exp(-h)) * d
            previous, previous_h = x0, h
        return x

    def sample(self, model_fn: ModelFn, noise, method: str = "ancestral", generator=None, progress=False):
        if method == "ancestral":
            return self.p_sample_loop(model_fn, noise, generator=generator, progress=progress)
        if method == "ddim":
            return self.ddim_sample_loop(model_fn, noise, generator=generator, progress=progress)
        if method == "dpm":
            return self.dpm_solver_sample_loop(model_fn, noise, progress=progress)
        raise ValueError(f"sampler {method!r} is not supported; choose 'ancestral', 'ddim' or 'dpm'")


def sampler_for(steps: str, num_timesteps: int = 1000, schedule: str = "linear", learn_sigma: bool = True):
    """A respaced chain and the sampling method its name implies: "ddim25" -> DDIM, "dpm20" -> DPM-Solver++(2M),
    "250" -> ancestral."""
    steps = str(steps)
    method = "ddim" if steps.startswith("ddim") else "dpm" if steps.startswith("dpm") else "ancestral"
    return GaussianDiffusion.create(num_timesteps, schedule, steps, learn_sigma), method


class DDPMProcess:
    """A DDPM diffusion process as an image decoder uses it, both directions: `training_losses` on the trained
    chain (noising, ADM's hybrid loss) and `sampler(name)` ("250", "ddim25", "dpm20") to denoise. The rectified
    flow's counterpart is flow.RectifiedFlow.

    Each sampler is its own respaced chain; `.to(device)` moves the training chain and every later sampler."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", learn_sigma: bool = True):
        self.num_timesteps, self.schedule, self.learn_sigma = num_timesteps, schedule, learn_sigma
        self.chain = GaussianDiffusion.create(num_timesteps, schedule, learn_sigma=learn_sigma)
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        self.chain = self.chain.to(self.device)
        return self

    def training_losses(self, model_fn: ModelFn, x_start, t=None, noise=None, rng: Optional[SampleNoise] = None):
        return self.chain.training_losses(model_fn, x_start, t, noise, rng)

    def sampler(self, spec: str):
        chain, method = sampler_for(spec, self.num_timesteps, self.schedule, self.learn_sigma)
        chain = chain.to(self.device)

        def sample(model_fn, noise, generator=None, progress: bool = False):
            return chain.sample(stoppable(model_fn), noise, method, generator, progress)

        return sample
