"""DeepSpeed ZeRO on 2 CPU ranks (gloo): the same run as one process, a dead rank that does not hang the other,
resume at the same and at another world size, signals that checkpoint and stop, and the slurm script's requeue."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import MICRO_TOKENIZER, micro_tokenizer_run
from semanticist_fast.common.runs import list_checkpoints, read_meta, write_weights_file
from semanticist_fast.config import ConfigError, load_config, to_dict
from semanticist_fast.data.loader import piece, rank_batches
from semanticist_fast.engine.checkpoint import consolidated_slices
from semanticist_fast.engine.train_config import TrainConfig
from semanticist_fast.engine.trainer import EXIT_RESUMABLE
from semanticist_fast.engine.zero import deepspeed_config
from semanticist_fast.models.tokenizer import SemanticistTokenizer
from semanticist_fast.tasks import train
from semanticist_fast.tasks.autoregressive_stage import ARRun

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QUIET = ["train.progress=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_port()), "-m", "semanticist_fast", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Losses per step and final weights (trained and EMA) equal within fp32 reduction-order tolerance. Over
    longer runs the tolerance on weights grows: an attention key bias has a gradient of pure rounding noise (softmax
    ignores it), which AdamW scales up to full-size steps, so its last bits differ between reduction orders."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-7), step
    for key in ("param", "ema"):
        wa, wb = consolidated_slices(list_checkpoints(a)[-1], key), consolidated_slices(list_checkpoints(b)[-1], key)
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=atol, msg=f"{key} {name}")


# ---- the global batch, the batch plan, the DeepSpeed config ----

def test_ranks_read_the_global_batches_of_one_process():
    one = rank_batches(48, 12, 12, 1, 0, seed=3, epoch=2)
    for world, micro in ((2, 6), (2, 3), (3, 2), (4, 1)):
        accum = 12 // (world * micro)
        per_rank = [rank_batches(48, 12, micro, world, r, seed=3, epoch=2) for r in range(world)]
        for step, whole in enumerate(one):
            pieces = {}
            for r in range(world):
                for a in range(accum):
                    pieces[piece(a, r, world, micro).start] = per_rank[r][step * accum + a]
            assert [item for start in sorted(pieces) for item in pieces[start]] == whole
    # Resuming at a step reads exactly the rest.
    assert rank_batches(48, 12, 6, 2, 1, seed=3, epoch=2, start_step=2) == rank_batches(48, 12, 6, 2, 1, 3, 2)[2:]


def test_batch_plan_and_its_errors():
    assert TrainConfig(batch_size=2048, micro_batch_size=64).batch_plan(8) == (64, 4)
    assert TrainConfig(batch_size=2048, grad_accum=4).batch_plan(8) == (64, 4)
    with pytest.raises(ValueError, match="micro_batch_size 64"):
        TrainConfig(batch_size=2048, micro_batch_size=64).batch_plan(64)
    with pytest.raises(ValueError, match="grad_accum 3"):
        TrainConfig(batch_size=2048, grad_accum=3).batch_plan(2)


def test_deepspeed_config_from_the_yaml_and_a_json_file():
    train_cfg = TrainConfig(batch_size=512, micro_batch_size=32, engine="deepspeed", zero_stage=3)
    from semanticist_fast.engine.train_config import OptimConfig
    optim = OptimConfig(grad_clip=2.0)
    cfg = deepspeed_config(train_cfg, optim, world_size=4)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (512, 32, 4)
    assert cfg["gradient_clipping"] == 2.0 and cfg["zero_optimization"]["stage"] == 3
    assert "stage3_prefetch_bucket_size" in cfg["zero_optimization"] and "bf16" not in cfg
    extra = {"zero_optimization": {"round_robin_gradients": True}, "flops_profiler": {"enabled": False}}
    merged = deepspeed_config(train_cfg, optim, 4, extra)
    assert merged["zero_optimization"]["round_robin_gradients"] and merged["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="zero_optimization.stage is set both"):
        deepspeed_config(train_cfg, optim, 4, {"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="'bf16'.*train.precision"):
        deepspeed_config(train_cfg, optim, 4, {"bf16": {"enabled": True}})


def test_launch_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="train.engine=deepspeed"):
        os.environ["WORLD_SIZE"] = "2"
        try:
            train(micro_tokenizer_run(*QUIET), tmp_path)
        finally:
            del os.environ["WORLD_SIZE"]
    with pytest.raises(ConfigError, match="--deepspeed-config"):
        train(micro_tokenizer_run(*QUIET), tmp_path, deepspeed_config={"flops_profiler": {}})
    assert not (tmp_path / "config.yaml").exists()


# ---- 2 ranks equal 1 process ----

@pytest.fixture(scope="module")
def tokenizer_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_single")
    train(micro_tokenizer_run(*QUIET), out)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_tokenizer_on_2_ranks_equals_one_process(stage, tokenizer_reference, tmp_path):
    out = tmp_path / "ds"
    torchrun(2, "train", "configs/tokenizer_tiny.yaml", "--out", str(out), *MICRO_TOKENIZER, *QUIET,
             "train.engine=deepspeed", f"train.zero_stage={stage}")
    meta = read_meta(list_checkpoints(out)[-1])
    assert meta["world_size"] == 2 and meta["zero_stage"] == stage
    assert sorted(meta["files"]) == ["ema.safetensors", "state/rank-00000.pt", "state/rank-00001.pt"]
    assert_same_run(tokenizer_reference, out)


MICRO_AR = ["model.layers=1", "model.heads=2", "model.dim=32", "model.head_width=32", "model.head_depth=1",
            "model.num_tokens=4", "model.diffusion_batch_mul=2", "model.head_sample_steps=4", "data.num_items=64",
            "cache.shard_size=24", "cache.views=center_flip", "train.batch_size=8", "train.epochs=2",
            "train.log_every=1", "train.ckpt_every=4", "train.preview_every=0", *QUIET]


@pytest.fixture(scope="module")
def micro_tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.safetensors"
    torch.manual_seed(0)
    run = micro_tokenizer_run()
    write_weights_file(path, SemanticistTokenizer(run.model).state_dict(), "tokenizer", to_dict(run))
    return path


@pytest.fixture(scope="module")
def ar_reference(micro_tokenizer_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ar_single")
    train(load_config(ARRun, "configs/autoregressive_tiny.yaml", MICRO_AR + [f"tokenizer={micro_tokenizer_file}"]), out)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ar_model_on_2_ranks_equals_one_process(stage, ar_reference, micro_tokenizer_file, tmp_path):
    out = tmp_path / "ds"
    torchrun(2, "train", "configs/autoregressive_tiny.yaml", "--out", str(out), *MICRO_AR,
             f"tokenizer={micro_tokenizer_file}", "train.engine=deepspeed", f"train.zero_stage={stage}")
    assert_same_run(ar_reference, out)
    # The ranks built the token cache together, one shard each in turn.
    assert len(list((out / "token_cache").glob("shard-*.json"))) == 3


# ---- a dead rank, and resuming at 2 ranks and at 1 ----

LONG = MICRO_TOKENIZER + QUIET + ["train.epochs=4", "train.ckpt_every=2", "train.keep_checkpoints=0"]


def _rank(rank: int, port: int, out: Path, *extra: str) -> subprocess.Popen:
    env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml",
                             "--out", str(out), *LONG, "train.engine=deepspeed", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted run, one process, started as the runs below are (a fresh interpreter, one thread)."""
    out = tmp_path_factory.mktemp("long_reference")
    _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(out), *LONG)
    return out


def test_a_killed_rank_ends_the_other_and_the_run_resumes_at_2_and_at_1_rank(long_reference, tmp_path):
    reference = long_reference

    out = tmp_path / "killed"
    port = _port()
    procs = [_rank(r, port, out, "train.collective_timeout_s=30") for r in range(2)]
    deadline = time.time() + 180
    while time.time() < deadline and len(list_checkpoints(out)) < 2 and procs[0].poll() is None:
        time.sleep(0.1)
    assert len(list_checkpoints(out)) >= 2, procs[0].stderr.read() if procs[0].poll() is not None else "too slow"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        procs[0].wait(timeout=90)
    finally:
        procs[0].kill()
    took = time.time() - killed_at
    stderr = procs[0].stderr.read()
    assert procs[0].returncode == 1, stderr[-2000:]
    assert took < 60, took  # within the 30 s collective deadline plus start-up slack
    assert "another rank died or did not answer" in stderr, stderr[-2000:]
    assert list_checkpoints(out)[-1].name < list_checkpoints(reference)[-1].name, "the run finished before the kill"

    at_two, at_one = tmp_path / "at_two", tmp_path / "at_one"
    shutil.copytree(out, at_two)
    shutil.copytree(out, at_one)
    torchrun(2, "train", "configs/tokenizer_tiny.yaml", "--out", str(at_two), "--resume", *LONG,
             "train.engine=deepspeed")
    assert_same_run(reference, at_two, atol=1e-4)
    _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(at_one), "--resume", *LONG)  # engine single
    assert_same_run(reference, at_one, atol=1e-4)


# ---- signals, and the slurm script ----

def test_sigterm_checkpoints_stops_with_75_and_resumes(long_reference, tmp_path):
    reference = long_reference
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml",
                             "--out", str(out), *LONG], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(out) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert proc.returncode == EXIT_RESUMABLE, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    stopped_at = read_meta(list_checkpoints(out)[-1])["step"]
    assert stopped_at < read_meta(list_checkpoints(reference)[-1])["step"]
    assert max(losses(out)) == stopped_at  # the checkpoint is of the last step it logged
    _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(out), "--resume", *LONG)
    assert losses(out) == losses(reference)  # bit for bit


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one task on this host: drop srun's options, run the command, remember its pid for scancel.
while [[ $1 == --* ]]; do shift; done
echo $$ > "$FAKE_SLURM/task.pid"
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$FAKE_SLURM/calls" ;;
esac
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
sig=${1#--signal=}
echo "scancel $sig $2" >> "$FAKE_SLURM/calls"
kill -"$sig" "$(cat "$FAKE_SLURM/task.pid")"
"""


def test_slurm_script_requeues_after_a_signal_and_the_requeued_job_resumes(tmp_path):
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {**ENV, "FAKE_SLURM": str(fake), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-001", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    env["PATH"] = f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}"  # `python` is this interpreter
    out = tmp_path / "run"
    args = ["bash", "launch/slurm.sbatch", "configs/tokenizer_tiny.yaml", str(out), *LONG]
    job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list_checkpoints(out) and job.poll() is None:
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    log_text, _ = job.communicate(timeout=180)
    assert job.returncode == EXIT_RESUMABLE, log_text[-3000:]
    calls = (fake / "calls").read_text().splitlines()
    assert calls == ["scancel USR1 4242", "requeue 4242"], calls
    stopped_at = read_meta(list_checkpoints(out)[-1])["step"]
    assert 0 < stopped_at < 32
    # The requeued job: the same script, the same arguments; it resumes and finishes.
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert read_meta(list_checkpoints(out)[-1])["step"] == 32
    assert "resumed from" in again.stderr + again.stdout
