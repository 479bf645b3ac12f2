"""Beta schedules and timestep respacing (ADM conventions)."""
import math

import torch


def linear_betas(num_timesteps: int) -> torch.Tensor:
    # ADM scales the endpoints so a shorter chain covers the same noise range as the 1000-step one.
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"noise schedule {schedule!r} is not supported; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, spacing: str) -> list[int]:
    """Which of the original timesteps a respaced chain keeps.

    "250" keeps 250 steps spread as evenly as possible (comma-separated counts split the chain into equal sections);
    "ddimN" keeps every (num_timesteps // N)-th step starting at 0, as DDIM does; "dpmN" keeps N steps from 0 to
    the noisiest (num_timesteps - 1), quadratic in time (DPM-Solver's "time_quadratic" grid: dense where the noise
    is low, where evenly spaced steps make the second-order extrapolation overshoot); "" keeps all.
    """
    if spacing in ("", None):
        return list(range(num_timesteps))
    if spacing.startswith("dpm"):
        try:
            desired = int(spacing[len("dpm"):])
        except ValueError:
            raise ValueError(f"timestep respacing {spacing!r}: expected 'dpm' and a step count, e.g. 'dpm20'") from None
        if not 2 <= desired <= num_timesteps:
            raise ValueError(f"DPM-Solver takes 2 to {num_timesteps} steps from a {num_timesteps}-step chain, "
                             f"got {spacing!r}")
        kept = [round((i / (desired - 1)) ** 2 * (num_timesteps - 1)) for i in range(desired)]
        for i in range(1, desired):  # rounding merges the first steps of a long grid: keep them distinct
            kept[i] = max(kept[i], kept[i - 1] + 1)
        return kept
    if spacing.startswith("ddim"):
        desired = int(spacing[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {desired} DDIM steps from a {num_timesteps}-step chain")
    try:
        section_counts = [int(x) for x in spacing.split(",")]
    except ValueError:
        raise ValueError(f"timestep respacing {spacing!r} is not understood; use e.g. '250', '50,50' or 'ddim25'") from None
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps (respacing {spacing!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))
