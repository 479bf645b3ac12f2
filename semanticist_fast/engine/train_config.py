"""The config sections every training stage shares: optimizer, training loop, runtime (fast paths, compile)."""
from dataclasses import dataclass, field
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
        for key in ("blr", "lr", "grad_clip"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"optim.{key} must be > 0, got {value}")
        for key in ("weight_decay", "warmup_epochs", "min_lr"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must each be in [0, 1), got {list(self.betas)}")


@dataclass
class ZeroConfig:
    """The DeepSpeed ZeRO settings users tune (engine/zero.py turns them into DeepSpeed's config)."""
    overlap_comm: bool = True  # overlap the gradient reduction with the backward pass
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 500_000_000  # ZeRO-1/2: elements per parameter all-gather bucket
    prefetch_bucket_size: int = 50_000_000  # ZeRO-3: elements of parameters fetched ahead of use
    param_persistence_threshold: int = 100_000  # ZeRO-3: parameters smaller than this stay whole on every rank
    offload_optimizer: Literal["none", "cpu"] = "none"  # AdamW moments and fp32 master weights in host memory

    def validate(self):
        for key in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.zero.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    batch_size: int = 2048  # global batch per optimizer step, over all ranks
    # Per rank and micro-step; gradient accumulation makes up the rest: batch_size = ranks x micro x accumulation.
    # None: batch_size / (ranks x grad_accum).
    micro_batch_size: Optional[int] = None
    grad_accum: int = 1  # used when micro_batch_size is None
    engine: Literal["single", "deepspeed"] = "single"  # deepspeed: ZeRO data parallel over the launched ranks
    zero_stage: Literal[1, 2, 3] = 2
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient norm: stop the run, or skip the step
    collective_timeout_s: float = 600.0  # a rank that waits this long for the others reports it and exits
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
        for key in ("batch_size", "grad_accum", "epochs", "log_every", "ckpt_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"train.micro_batch_size must be > 0, got {self.micro_batch_size}")
        for key in ("preview_every", "keep_checkpoints", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        self.batch_plan(1)  # the world size is known at launch; one process must fit already

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(micro-batch per rank, accumulation steps) that make up train.batch_size on world_size ranks."""
        B, W = self.batch_size, world_size
        if self.micro_batch_size is not None:
            m = self.micro_batch_size
            if B % (W * m):
                raise ValueError(f"train.batch_size {B} is not a multiple of {W} ranks x train.micro_batch_size {m}; "
                                 f"choose a micro_batch_size that divides {B // W if B % W == 0 else B} "
                                 f"(or a batch_size that {W} x {m} divides)")
            return m, B // (W * m)
        A = self.grad_accum
        if B % (W * A):
            raise ValueError(f"train.batch_size {B} is not a multiple of {W} ranks x train.grad_accum {A}; set "
                             f"train.micro_batch_size (per rank) instead, or a batch_size that {W * A} divides")
        return B // (W * A), A


@dataclass
class RuntimeConfig:
    fast_kernels: bool = True  # Triton / C++ / flash paths; false = plain PyTorch everywhere
    compile: bool = False  # regional torch.compile of the transformer blocks
