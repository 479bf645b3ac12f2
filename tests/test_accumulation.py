"""Gradient accumulation and world sizes: a global batch taken as 1, 2 or 4 micro-batches per rank, on one
process (the single engine) and on 2 ranks under ZeRO 1/2/3, trains the same run (per-step losses, gradient norms
and final weights, fp32); the EMA moves once per optimizer step; a run stopped on one process resumes on 2 ranks
with the same global batches."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import MICRO_TOKENIZER, micro_tokenizer_run
from semanticist_fast.common.runs import list_checkpoints, read_meta
from semanticist_fast.engine.checkpoint import consolidated_slices
from semanticist_fast.tasks import train
from test_distributed import ENV, ROOT, _port, assert_same_run, losses

# Clipping that bites (the tiny model's gradient norms are 0.3 to 1.5) checks that the norm is the accumulated
# gradient's; an EMA decay of 0.5 makes one update more or less per step show far above rounding.
ACCUM = ["train.progress=false", "optim.grad_clip=0.25", "train.ema_decay=0.5", "train.ckpt_every=1",
         "train.keep_checkpoints=0"]
BATCH = 8  # MICRO_TOKENIZER's train.batch_size; 16 steps


def grad_norms(out) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_training(reference, out) -> None:
    assert_same_run(reference, out)
    ga, gb = grad_norms(reference), grad_norms(out)
    assert any(g > 0.25 for g in ga.values()), "clipping never engaged: the test would not see a wrong norm"
    for step in ga:
        assert gb[step] == pytest.approx(ga[step], rel=1e-5), step


def assert_ema_moved_once_per_step(out, decay: float = 0.5) -> None:
    """ema(k+1) = decay * ema(k) + (1 - decay) * weights(k+1) between every two consecutive checkpoints."""
    checkpoints = list_checkpoints(out)
    assert [read_meta(c)["step"] for c in checkpoints] == list(range(1, 17))
    for before, after in zip(checkpoints, checkpoints[1:]):
        ema, new_ema, new = (consolidated_slices(c, key) for c, key in ((before, "ema"), (after, "ema"),
                                                                        (after, "param")))
        for name in ema:
            torch.testing.assert_close(new_ema[name], decay * ema[name] + (1 - decay) * new[name], rtol=1e-5,
                                       atol=1e-6, msg=f"{after.name} {name}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch in one micro-batch."""
    out = tmp_path_factory.mktemp("accum_reference")
    train(micro_tokenizer_run(*ACCUM), out)
    return out


@pytest.mark.parametrize("accum", [2, 4])
def test_single_engine_accumulation_equals_one_micro_batch(accum, reference, tmp_path):
    out = tmp_path / "run"
    train(micro_tokenizer_run(*ACCUM, f"train.micro_batch_size={BATCH // accum}"), out)
    assert_same_training(reference, out)
    assert_ema_moved_once_per_step(out)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """On 2 ranks, one launch: ZeRO 1/2/3 at accumulation 2 and 4, and a run stopped on one process (the single
    engine, no accumulation) resumed on 2 ranks under ZeRO-3 with accumulation 2."""
    root = tmp_path_factory.mktemp("zero_accum")
    jobs = [{"out": str(root / f"zero{stage}_accum{accum}"),
             "overrides": MICRO_TOKENIZER + ACCUM + ["train.engine=deepspeed", f"train.zero_stage={stage}",
                                                    f"train.micro_batch_size={BATCH // (2 * accum)}"]}
            for stage in (1, 2, 3) for accum in (2, 4)]
    stopped = root / "one_to_two"
    train(micro_tokenizer_run(*ACCUM), stopped, stop_at_step=6)
    assert read_meta(list_checkpoints(stopped)[-1])["world_size"] == 1
    jobs.append({"out": str(stopped), "resume": True,
                 "overrides": MICRO_TOKENIZER + ACCUM + ["train.engine=deepspeed", "train.zero_stage=3",
                                                        "train.micro_batch_size=2"]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "tests/train_runs.py", str(root / "jobs.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), ENV.get("PYTHONPATH")]))}, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


@pytest.mark.parametrize("accum", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_accumulation_equals_one_micro_batch(stage, accum, zero_runs, reference):
    out = zero_runs / f"zero{stage}_accum{accum}"
    meta = read_meta(list_checkpoints(out)[-1])
    assert (meta["world_size"], meta["zero_stage"]) == (2, stage)
    assert_same_training(reference, out)
    assert_ema_moved_once_per_step(out)


def test_resume_from_one_process_on_2_ranks(zero_runs, reference):
    out = zero_runs / "one_to_two"
    assert read_meta(list_checkpoints(out)[5])["world_size"] == 1  # step 6, written by the single process
    assert read_meta(list_checkpoints(out)[-1])["world_size"] == 2
    assert_same_training(reference, out)
