"""The config sections every training stage shares: optimizer, training loop, runtime (fast paths, compile)."""
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class OptimConfig:
    blr: float = 2.5e-5  # lr = blr * global_batch / 256, unless lr is set
    lr: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_epochs: float = 10.0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 3.0

    def validate(self):
        if self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    batch_size: int = 2048  # global batch per optimizer step
    grad_accum: int = 1
    epochs: int = 400
    ema_decay: float = 0.999
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU; CPU always runs fp32
    device: str = "auto"
    num_workers: int = 4
    log_every: int = 50
    ckpt_every: int = 1000
    preview_every: int = 5000  # 0 = never
    keep_checkpoints: int = 3
    progress: bool = True

    def validate(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size {self.batch_size} must be divisible by train.grad_accum {self.grad_accum}")
        for key in ("batch_size", "grad_accum", "epochs", "log_every", "ckpt_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class RuntimeConfig:
    fast_kernels: bool = True  # Triton / C++ / flash paths; false = plain PyTorch everywhere
    compile: bool = False  # regional torch.compile of the transformer blocks
