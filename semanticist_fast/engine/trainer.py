"""The training loop, shared by the tokenizer and the AR model.

A task supplies the trainable model and `loss(model, batch, step, epoch) -> (loss, metrics)`; the trainer owns the
optimizer, schedule, EMA, precision, logging, previews and checkpoints. Metrics stay on the device between logging
intervals, so the hot loop never waits on the host.
"""
import json
import logging
import time
from pathlib import Path
from typing import Optional, Protocol

import torch

from ..common.device import autocast_for
from ..common.runs import latest_checkpoint, load_checkpoint
from ..data.loader import epoch_loader, steps_per_epoch
from ..models.weights import load_model_state
from .checkpoint import save_checkpoint
from .config import OptimConfig, TrainConfig
from .ema import EMA
from .optimizer import LocalOptimizerStep, OptimizerStep
from .schedule import lr_at

log = logging.getLogger(__name__)


class Task(Protocol):
    kind: str  # the stage, stored in checkpoints ("tokenizer", "autoregressive")
    model: torch.nn.Module

    def loss(self, model, batch, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def preview(self, model, step: int, path: Path) -> None: ...


class Trainer:
    def __init__(self, task: Task, train_set, train: TrainConfig, optim: OptimConfig, out_dir: Path,
                 run_config: dict, device: torch.device, optimizer_step: Optional[OptimizerStep] = None):
        """optimizer_step: the seam a distributed engine fills; by default one process's AdamW."""
        self.task, self.train_set, self.cfg, self.optim_cfg = task, train_set, train, optim
        self.out_dir, self.run_config, self.device = Path(out_dir), run_config, device
        self.model = task.model
        self.micro_batch = train.batch_size // train.grad_accum
        self.steps_per_epoch = steps_per_epoch(len(train_set), self.micro_batch) // train.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(train_set)} items: not enough for one step of batch "
                             f"{train.batch_size}; lower train.batch_size or add data")
        self.total_steps = train.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(optim.warmup_epochs * self.steps_per_epoch))
        self.base_lr = optim.lr if optim.lr is not None else optim.blr * train.batch_size / 256
        self.optimizer_step = optimizer_step or LocalOptimizerStep(
            self.model, self.base_lr, optim.betas, optim.weight_decay, optim.grad_clip, train.grad_accum)
        self.ema = EMA(self.model, train.ema_decay)
        self.precision_bf16 = train.precision == "bf16"
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "kind": self.task.kind,
            "config": self.run_config,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer_step.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": rng,
        }

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.out_dir, self.cfg.keep_checkpoints)

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        load_model_state(self.model, state["model"], what=f"checkpoint {path}")
        self.ema.load_state_dict(state["ema"])
        self.optimizer_step.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    def _truncate_metrics(self, step: int) -> None:
        """Drop logged lines past the checkpoint, so the log of a resumed run reads like an uninterrupted one."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    # -- loop ----------------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_at_step: Optional[int] = None) -> dict:
        """Train to the end of the schedule (or stop early at stop_at_step, leaving a resumable checkpoint)."""
        if resume:
            latest = latest_checkpoint(self.out_dir)
            if latest is None:
                log.warning("--resume: no checkpoint in %s, starting from scratch", self.out_dir)
            else:
                self.restore(latest)
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        writer = self._tensorboard()
        bar = self._progress(end)
        sums: dict[str, torch.Tensor] = {}
        count, last_time, last_step = 0, time.perf_counter(), self.step
        micro_batches_per_epoch = self.steps_per_epoch * self.cfg.grad_accum
        last_metrics: dict = {}
        self.model.train()
        while self.step < end:
            loader = epoch_loader(self.train_set, self.micro_batch, self.cfg.seed, self.epoch, self.batch_in_epoch,
                                  self.cfg.num_workers, pin_memory=self.device.type == "cuda")
            micro = 0
            for batch in loader:
                with autocast_for(self.device, self.precision_bf16):
                    loss, metrics = self.task.loss(self.model, batch, self.step, self.epoch)
                self.optimizer_step.backward(loss)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                count += 1
                micro += 1
                self.batch_in_epoch += 1
                if micro % self.cfg.grad_accum:
                    continue
                lr = lr_at(self.step, self.base_lr, self.warmup_steps, self.total_steps,
                           self.optim_cfg.schedule, self.optim_cfg.min_lr)
                grad_norm = self.optimizer_step.step(lr)
                sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float() * self.cfg.grad_accum
                self.ema.update()
                self.step += 1
                epoch_done = self.batch_in_epoch >= micro_batches_per_epoch
                if epoch_done:  # advance before any checkpoint, so one saved at an epoch's end resumes at the next
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if bar is not None:
                    bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    means = (torch.stack(list(sums.values())) / count).tolist()  # the one sync per interval
                    now = time.perf_counter()  # after the sync, so images/s counts finished work
                    last_metrics = dict(zip(sums, means))
                    last_metrics["lr"] = lr
                    images_per_s = (self.step - last_step) * self.cfg.batch_size / max(now - last_time, 1e-9)
                    self._log(writer, bar, last_metrics, images_per_s)
                    sums, count, last_time, last_step = {}, 0, now, self.step
                if self.cfg.preview_every and self.step % self.cfg.preview_every == 0:
                    self._preview()
                if self.step % self.cfg.ckpt_every == 0 or self.step == end:
                    self.save()
                if self.step >= end or epoch_done:
                    break
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        return last_metrics

    def _preview(self) -> None:
        preview = getattr(self.task, "preview", None)
        if preview is not None:
            preview(self.ema.model, self.step, self.out_dir / "previews" / f"step-{self.step:08d}.png")

    def _log(self, writer, bar, metrics: dict, images_per_s: float) -> None:
        record = {"step": self.step, "epoch": self.epoch, "images_per_s": images_per_s, **metrics}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, self.step)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics['lr']:.2e}",
                            img_s=f"{images_per_s:.1f}")

    def _tensorboard(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: scalars go to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out_dir / "tb"))

    def _progress(self, end: int):
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)


def fit_task(task: Task, train_set, run, out_dir: Path, device: torch.device, resume: bool = False,
             stop_at_step: Optional[int] = None) -> dict:
    """The tail shared by both stages: compile the blocks if asked, build the trainer, report the plan, train.
    `run` is a stage's run config: its train, optim and runtime sections drive the trainer."""
    from ..config import to_dict

    if run.runtime.compile:
        from .compile import compile_blocks
        compile_blocks(task.model)
    trainer = Trainer(task, train_set, run.train, run.optim, out_dir, to_dict(run), device)
    log.info("%s: %.2fM trainable parameters, %d steps (%d per epoch, warmup %d), lr %.2e", task.kind,
             sum(p.numel() for p in task.model.parameters() if p.requires_grad) / 1e6, trainer.total_steps,
             trainer.steps_per_epoch, trainer.warmup_steps, trainer.base_lr)
    return trainer.fit(resume=resume, stop_at_step=stop_at_step)
