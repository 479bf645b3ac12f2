"""Learning-rate schedules as pure functions of the optimizer step (so resuming needs only the step)."""
import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine", min_lr: float = 0.0) -> float:
    """Linear warmup from 0, then cosine down to min_lr at total_steps (the full half-cosine), or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
