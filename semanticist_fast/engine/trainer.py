"""The training loop, shared by the tokenizer and the AR model, on one process or many.

A task supplies the trainable model and `loss(model, batch, step, epoch, rng) -> (loss, metrics)`; the trainer owns
the schedule, precision, logging, previews and checkpoints, and drives an engine (engine/engines.py: one process, or
DeepSpeed ZeRO), which runs the loss, steps the optimizer and keeps the EMA, without asking which engine it is.

What it guarantees:
- Metrics, the non-finite flag and the step it first rose stay on the device between logging intervals; one
  collective per interval averages them over the ranks (none per step).
- A step with a non-finite loss or gradient norm never changes the weights. `train.on_nonfinite: stop` ends the run
  at the next interval (or checkpoint) naming that step and the last good checkpoint; `skip` goes on and counts.
  A non-finite model is never written.
- SIGTERM / SIGUSR1 finish the current step, write a checkpoint at the next interval boundary and end the run with
  EXIT_RESUMABLE (slurm requeues on it); `--resume` continues where it stopped.
- Logging, progress, TensorBoard and previews happen on rank 0 only. Without a terminal the progress bar becomes
  a line per logging interval, at most about one per tenth of the run.
"""
import contextlib
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ..common import signals
from ..common.device import autocast_for
from ..common.distributed import World
from ..common.noise import BatchNoise
from ..common.runs import report_skipped
from ..common.seeds import NOISE_STREAM, derive_seed
from ..data.loader import epoch_loader, piece, steps_per_epoch
from .checkpoint import choose_checkpoint, remove_orphans, restore_checkpoint, rng_state, save_checkpoint, set_aside
from .train_config import OptimConfig, TrainConfig
from .engines import build_engine
from .schedule import lr_at

log = logging.getLogger(__name__)

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; run again with --resume


class Task(Protocol):
    kind: str  # the stage, stored in checkpoints ("tokenizer", "autoregressive")
    model: torch.nn.Module

    def loss(self, model, batch, step: int, epoch: int, rng) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def new_model(self) -> torch.nn.Module: ...  # a fresh model of the same config (for an engine's previews)

    def preview(self, model, step: int, path: Path) -> None: ...


class NonFiniteError(RuntimeError):
    pass


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}; "
                         "continue with --resume")


class Trainer:
    def __init__(self, task: Task, train_set, train: TrainConfig, optim: OptimConfig, out_dir: Path,
                 run_config: dict, world: World, deepspeed_config: Optional[dict] = None):
        self.task, self.train_set, self.cfg, self.optim_cfg = task, train_set, train, optim
        self.out_dir, self.run_config, self.world, self.device = Path(out_dir), run_config, world, world.device
        self.model = task.model
        self.micro_batch, self.accum = train.batch_plan(world.size)
        self.steps_per_epoch = steps_per_epoch(len(train_set), train.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(train_set)} items: not enough for one step of batch "
                             f"{train.batch_size}; lower train.batch_size or add data")
        self.total_steps = train.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(optim.warmup_epochs * self.steps_per_epoch))
        self.base_lr = optim.lr if optim.lr is not None else optim.blr * train.batch_size / 256
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.state_order = list(self.model.state_dict())
        self.engine = build_engine(task, train, optim, self.base_lr, world, deepspeed_config)
        self.shard, self.ema = self.engine.shard, self.engine.ema
        self.precision_bf16 = train.precision == "bf16"
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.last_checkpoint: Optional[Path] = None
        self._previewed = 0  # the step of the last preview (or where this run started)
        self.skipped_files: Optional[int] = None
        self._stop_signal = 0
        self._reset_flags()

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"kind": self.task.kind, "config": self.run_config, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, **self.engine.checkpoint_meta()}

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step, unless the model is not finite (then say so and write none)."""
        self._check_nonfinite(at_checkpoint=True)
        finite = torch.stack([torch.isfinite(t).all() for t in self.ema.shadows + [f.master for f in self.shard.fragments]]
                             ).all().float().reshape(1) if self.shard.fragments else torch.ones(1, device=self.device)
        if self.world.all_reduce_sum(finite, "finiteness check").item() < self.world.size:
            message = (f"the weights are not finite at step {self.step}: no checkpoint written; the last good one "
                       f"is {self.last_checkpoint or 'none'}")
            if self.cfg.on_nonfinite == "stop":
                raise NonFiniteError(message)
            log.warning(message)
            return None
        path = save_checkpoint(self.world, self.out_dir, self.step, self._meta(), self.shard, self.ema,
                               dict(self.model.named_buffers()), self.state_order, rng_state(self.device),
                               self.cfg.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def resume(self) -> bool:
        """Restore the newest checkpoint that verifies; newer ones that do not are named and set aside."""
        found, skipped = choose_checkpoint(self.world, self.out_dir)
        if self.world.is_main:
            report_skipped(skipped)
            for path, _ in skipped:
                if path.is_dir():
                    log.warning("set aside as %s", set_aside(path))
        self.world.barrier("resume")
        if found is None:
            if skipped:
                raise ValueError(f"--resume: no checkpoint in {self.out_dir} verifies (see the warnings above); "
                                 "start a new run with another --out")
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.out_dir)
            return False
        meta = restore_checkpoint(self.world, found, self.shard, self.ema, self.param_names)
        self.step, self.epoch, self.step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
        self.last_checkpoint = found
        if self.world.is_main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d (epoch %d, step %d of it), written by %d rank(s)", found, self.step,
                 self.epoch, self.step_in_epoch, meta["world_size"])
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop logged lines past the checkpoint, so the log of a resumed run reads like an uninterrupted one."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if line and json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a torn last line from a kill mid-write
            path.write_text("".join(line + "\n" for line in kept))

    # -- loop ----------------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_at_step: Optional[int] = None) -> dict:
        """Train to the end of the schedule (or stop early at stop_at_step, leaving a resumable checkpoint)."""
        if self.world.is_main:
            for orphan in remove_orphans(self.out_dir):
                log.info("removed %s, left by a run killed while writing a checkpoint", orphan)
        self.world.barrier("start")
        if resume:
            self.resume()
        self._previewed = self.step
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        main = self.world.is_main
        writer = self._tensorboard() if main else None
        progress = _Progress(end, self.step, self.cfg.progress and main)
        sums: dict[str, torch.Tensor] = {}
        count, last_time, last_step = 0, time.perf_counter(), self.step
        last_metrics: dict = {}
        # A stop signal that came during start-up (the CLI held it) arrives here.
        listening = signals.listening(self._on_signal) if _in_main_thread() else contextlib.nullcontext()
        self.model.train()
        with listening:
            try:
                while self.step < end:
                    loader = epoch_loader(self.train_set, self.cfg.batch_size, self.cfg.seed, self.epoch,
                                          self.step_in_epoch, self.cfg.num_workers, self.device.type == "cuda",
                                          self.micro_batch, self.world.size, self.world.rank)
                    micro = 0
                    step_bad = torch.zeros((), dtype=torch.bool, device=self.device)
                    for batch in loader:
                        rows = piece(micro, self.world.rank, self.world.size, self.micro_batch)
                        rng = BatchNoise(derive_seed(self.cfg.seed, NOISE_STREAM, self.step), self.cfg.batch_size,
                                         rows, self.device)
                        with autocast_for(self.device, self.precision_bf16):
                            loss, metrics = self.engine.loss(batch, self.step, self.epoch, rng)
                        self.engine.backward(loss)
                        step_bad |= ~torch.isfinite(loss.detach())
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0) + v.detach().float()
                        count += 1
                        micro += 1
                        if micro < self.accum:
                            continue
                        micro = 0
                        lr = lr_at(self.step, self.base_lr, self.warmup_steps, self.total_steps,
                                   self.optim_cfg.schedule, self.optim_cfg.min_lr)
                        grad_norm = self.engine.step(lr)  # the EMA moves with it
                        step_bad |= ~torch.isfinite(grad_norm)
                        self._note_bad_step(step_bad)
                        step_bad = torch.zeros((), dtype=torch.bool, device=self.device)
                        sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float() * self.accum
                        self.step += 1
                        self.step_in_epoch += 1
                        epoch_done = self.step_in_epoch >= self.steps_per_epoch
                        if epoch_done:  # advance before any checkpoint: one saved at an epoch's end resumes at the next
                            self.epoch += 1
                            self.step_in_epoch = 0
                            self._report_skipped_files()
                        progress.update()
                        if self.step % self.cfg.log_every == 0 or self.step == end:
                            stop = self._end_interval(sums, count, lr, last_time, last_step, writer, progress)
                            last_metrics = stop.pop("metrics")
                            sums, count, last_time, last_step = {}, 0, time.perf_counter(), self.step
                            if stop["signal"]:
                                path = self.save()
                                raise StopRequested(stop["signal"], self.step, path)
                        checkpoint = None
                        if self.step % self.cfg.ckpt_every == 0 or self.step == end:
                            checkpoint = self.save()
                        self._preview(checkpoint)
                        if self.step >= end or epoch_done:
                            break
            except RuntimeError as e:
                failure = self.world.collective_error(e, f"training step {self.step + 1}")
                if failure is None:
                    raise
                raise failure from e
            finally:
                progress.close()
                if writer is not None:
                    writer.close()
        return last_metrics

    # -- non-finite guard ----------------------------------------------------------------------------------------------
    def _reset_flags(self) -> None:
        self._bad_steps = torch.zeros((), dtype=torch.float32, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def _note_bad_step(self, bad: torch.Tensor) -> None:
        """Count the step on the device, and keep the first one that went bad (no host sync). Steps are numbered as
        metrics.jsonl and checkpoints number them: the one being taken is self.step + 1."""
        self._bad_steps += bad.float()
        first_time = bad & (self._first_bad < 0)
        self._first_bad = torch.where(first_time, torch.full_like(self._first_bad, self.step + 1), self._first_bad)

    def _first_bad_step(self) -> int:
        """The earliest bad step over all ranks (a second collective, only once something went bad)."""
        first = torch.where(self._first_bad < 0, torch.full_like(self._first_bad, 2 ** 62), self._first_bad)
        return int(self.world.all_reduce_min(first.reshape(1).clone(), "non-finite step").item())

    def _check_nonfinite(self, at_checkpoint: bool = False, bad_total: Optional[float] = None) -> None:
        if bad_total is None:
            bad_total = self.world.all_reduce_sum(self._bad_steps.reshape(1).clone(), "non-finite check").item()
        if bad_total == 0:
            return
        first = self._first_bad_step()
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {first} (train.on_nonfinite=stop); those steps left the "
                f"weights unchanged and no checkpoint was written after it; the last good checkpoint is "
                f"{self.last_checkpoint or 'none (the run wrote none yet)'}. Look at the data and optim.lr, then "
                f"continue with --resume, or set train.on_nonfinite=skip")
        if not at_checkpoint:
            log.warning("%d step(s) skipped since the last interval: non-finite loss or gradient norm, first at "
                        "step %d (train.on_nonfinite=skip)", int(bad_total), first)
            self._reset_flags()

    # -- logging -----------------------------------------------------------------------------------------------------
    def _report_skipped_files(self) -> None:
        """At each epoch's end: how many unreadable files the data has skipped so far (summed over ranks); the
        count also goes into every later metrics record."""
        if not hasattr(self.train_set, "num_skipped"):
            return
        count = torch.tensor([float(self.train_set.num_skipped)], device=self.device)
        self.skipped_files = int(self.world.all_reduce_sum(count, "skipped-file count").item())
        if self.world.is_main and self.skipped_files:
            log.warning("epoch %d: %d unreadable image file(s) skipped so far (each replaced by the next readable "
                        "one; their paths are in the warnings above)", self.epoch - 1, self.skipped_files)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # launch/slurm.sbatch repeats its request until the ranks are gone
            return
        self._stop_signal = signum
        log.warning("received %s: stopping at the next logging interval, after writing a checkpoint",
                    signal.Signals(signum).name)

    def _end_interval(self, sums: dict, count: int, lr: float, last_time: float, last_step: int, writer,
                      progress) -> dict:
        """The one collective of an interval: metric means over all ranks, the non-finite count, stop requests."""
        names = list(sums)
        local = torch.stack([sums[k] for k in names] + [self._bad_steps, torch.tensor(float(self._stop_signal),
                                                                                      device=self.device)])
        totals = self.world.all_reduce_sum(local, "metrics reduction").tolist()  # the one host sync of the interval
        now = time.perf_counter()  # after the sync, so images/s counts finished work
        metrics = {k: v / (count * self.world.size) for k, v in zip(names, totals)}
        bad_total, stop_requests = totals[-2], totals[-1]
        metrics["skipped_steps"] = bad_total
        metrics["lr"] = lr
        images_per_s = (self.step - last_step) * self.cfg.batch_size / max(now - last_time, 1e-9)
        if self.world.is_main:
            self._log(writer, progress, metrics, images_per_s)
        self._check_nonfinite(bad_total=bad_total)
        signum = self._stop_signal or (int(signal.SIGTERM) if stop_requests else 0)
        return {"metrics": metrics, "signal": signum}

    def _log(self, writer, progress, metrics: dict, images_per_s: float) -> None:
        record = {"step": self.step, "epoch": self.epoch, "images_per_s": images_per_s, **metrics}
        if self.skipped_files is not None:
            record["skipped_files"] = self.skipped_files
        nonfinite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if nonfinite:  # JSON has no NaN: write null, and name the keys
            record = {k: (None if k in nonfinite else v) for k, v in record.items()}
            record["nonfinite"] = nonfinite
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k not in ("step", "nonfinite") and v is not None:
                    writer.add_scalar(f"train/{k}", v, self.step)
        progress.report(self.step, metrics, images_per_s)

    def _preview(self, checkpoint: Optional[Path]) -> None:
        """A preview of the EMA weights (rank 0) at the first step on or after each multiple of preview_every at
        which the engine can give them: every such step on one process, the next checkpoint under ZeRO.
        `checkpoint`: the one written at this step, if any."""
        every = self.cfg.preview_every
        preview = getattr(self.task, "preview", None)
        if not every or preview is None or not self.world.is_main or self.step // every <= self._previewed // every:
            return
        model = self.engine.ema_model(checkpoint)
        if model is None:
            return
        self._previewed = self.step
        preview(model, self.step, self.out_dir / "previews" / f"step-{self.step:08d}.png")

    def _tensorboard(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: scalars go to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out_dir / "tb"))


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _Progress:
    """A tqdm bar on a terminal; otherwise a line at logging intervals, at most about one per tenth of the run."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self._next_line = initial
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, metrics: dict[str, Any], images_per_s: float) -> None:
        loss, lr = metrics.get("loss", float("nan")), metrics["lr"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        elif self.enabled and (step >= self._next_line or step == self.total):
            log.info("step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f img/s", step, self.total, 100 * step / self.total,
                     loss, lr, images_per_s)
            self._next_line = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit_task(task: Task, train_set, run, out_dir: Path, world: World, resume: bool = False,
             stop_at_step: Optional[int] = None, deepspeed_config: Optional[dict] = None) -> dict:
    """The tail shared by both stages: compile the blocks if asked, build the trainer, report the plan, train.
    `run` is a stage's run config: its train, optim and runtime sections drive the trainer."""
    from ..config import to_dict

    if run.runtime.compile:
        from .compile import compile_blocks
        compile_blocks(task.model)
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    trainer = Trainer(task, train_set, run.train, run.optim, out_dir, to_dict(run), world, deepspeed_config)
    if world.is_main:
        log.info("%s: %.2fM trainable parameters, %d steps (%d per epoch, warmup %d), lr %.2e, engine %s on %d "
                 "rank(s), micro-batch %d x %d accumulation", task.kind, trainable / 1e6, trainer.total_steps,
                 trainer.steps_per_epoch, trainer.warmup_steps, trainer.base_lr, run.train.engine, world.size,
                 trainer.micro_batch, trainer.accum)
    return trainer.fit(resume=resume, stop_at_step=stop_at_step)

