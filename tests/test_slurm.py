"""launch/slurm.sbatch on a real one-node Slurm (scripts/local_slurm.sh: Debian's slurm-wlm and munge), submitted
unchanged with command-line overrides only: preempted twice, requeued twice, it ends with one process's losses.
Also the script's requeue decision when the ranks' exit codes mix, and DeepSpeed's JIT-build lock left by a killed
build, which once hung every later start."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import MICRO_TOKENIZER
from semanticist_fast.common.runs import list_checkpoints, read_meta

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
EXIT_RESUMABLE = 75

# The tiny tokenizer, short: 3 epochs of 32 steps of 16 images, a loss logged every step (the stop granularity).
RUN = ["data.num_items=512", "train.batch_size=16", "train.epochs=3", "train.log_every=1", "train.ckpt_every=1000",
       "train.preview_every=0", "train.progress=false", "train.collective_timeout_s=120"]
PLANNED_STEPS = 96


def _missing_slurm() -> str:
    tools = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel") if not shutil.which(t)]
    if tools:
        return f"{', '.join(tools)} not installed (Debian's slurm-wlm and munge: bash scripts/install.sh --dev)"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return ""


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two free consecutive ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment of a started cluster (SLURM_CONF); it is taken down after the tests, failed or not."""
    reason = _missing_slurm()
    if reason:
        pytest.skip(reason)
    env = {**ENV, "LOCAL_SLURM_DIR": str(tmp_path_factory.mktemp("slurm") / "cluster"),
           "LOCAL_SLURM_PORT": str(_free_port_pair())}
    try:
        up = subprocess.run(["bash", "scripts/local_slurm.sh", "up"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        env["SLURM_CONF"] = re.fullmatch(r"export SLURM_CONF=(\S+)\n", up.stdout).group(1)
        yield env
    finally:
        subprocess.run(["bash", "scripts/local_slurm.sh", "down"], cwd=ROOT, env=env, capture_output=True,
                       timeout=120)


def _slurm(env, *args: str) -> str:
    r = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{args}: {r.stderr}"
    return r.stdout


def _job(env, job: str) -> dict:
    text = _slurm(env, "scontrol", "show", "job", job)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(what: str, condition, timeout: float, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout} s for {what}; job log:\n" + (log.read_text()[-4000:] if log.exists()
                                                                         else "(none)"))


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, one process (engine single), start to end."""
    out = tmp_path_factory.mktemp("reference")
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml", "--out",
                        str(out), *RUN], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_preempted_twice_requeued_twice_the_job_ends_with_one_process_losses(cluster, reference, tmp_path):
    env, out, log = cluster, tmp_path / "run", tmp_path / "job.out"
    job = _slurm(env, "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 "--gpus-per-node=0", "--time=10", "--signal=B:USR1@80", f"--output={log}",
                 "launch/slurm.sbatch", "configs/tokenizer_tiny.yaml", str(out), *RUN).strip()

    def started(restart: int):
        return lambda: log.exists() and f"(restart {restart}): 2 ranks" in log.read_text()

    # 1. As the ranks start (the batch script is up, the ranks not yet): what --signal=B:USR1 sends, to the script.
    _wait("the job to start", started(0), 180, log)
    _slurm(env, "scancel", "--batch", "--signal=USR1", job)
    _wait("the first requeue", started(1), 300, log)
    first_stop = read_meta(list_checkpoints(out)[-1])["step"]
    assert 0 < first_stop < PLANNED_STEPS  # it made progress, though stopped before training had begun
    # 2. Mid-training: the time limit's USR1 again. (SIGTERM to the batch step reaches srun as well, which then ends
    # the step while the ranks write their checkpoint: a race the ranks lost once in CI, so the README has preemption
    # send the job's --signal instead; the script's TERM path is held by the stand-in srun test below.)
    _wait("training to go on", lambda: out.joinpath("metrics.jsonl").exists() and
          max(_losses(out)) >= first_stop + 10, 300, log)
    _slurm(env, "scancel", "--batch", "--signal=USR1", job)
    _wait("the second requeue", started(2), 300, log)
    second_stop = read_meta(list_checkpoints(out)[-1])["step"]
    assert first_stop + 10 <= second_stop < PLANNED_STEPS
    # 3. Left alone, it finishes.
    _wait("the job to complete", lambda: _job(env, job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 300,
          log)
    state = _job(env, job)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "2"), text[-4000:]
    assert text.count("caught USR1") == 2
    assert text.count("requeueing job") == 2
    # Every rank of both stopped runs wrote its checkpoint and exited 75, none killed by another.
    assert text.count("stopped by SIGUSR1 after step") == 4  # the script passes on either signal as USR1
    srun_errors = re.findall(r"srun: error: .*", text)
    assert srun_errors and all(e.endswith("Exited with exit code 75") for e in srun_errors), srun_errors
    # Each run resumed where the one before stopped, and the last ended at the planned step.
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert resumed == [first_stop, second_stop], resumed
    assert [p.name for p in list_checkpoints(out)] == [f"ckpt-{s:08d}" for s in (first_stop, second_stop,
                                                                                 PLANNED_STEPS)]
    assert read_meta(list_checkpoints(out)[-1])["world_size"] == 2
    # The losses of every step, logged once each: those of one process (the same global batches, in fp32).
    records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, PLANNED_STEPS + 1))
    expected, got = _losses(reference), _losses(out)
    for step in range(1, PLANNED_STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=2e-3), step


# ---- a stop during start-up, and the requeue decision, with srun standing in (no cluster needed) ----

def _blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0


def test_a_stop_during_start_up_waits_for_the_first_interval(tmp_path):
    """SIGTERM while the CLI is still importing and building: held, not fatal; the run stops after its first step
    with a checkpoint and exits 75 (it used to die of the signal, with nothing saved)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml", "--out",
                             str(out), *MICRO_TOKENIZER], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not _blocked_signals(proc.pid) >> (signal.SIGTERM - 1) & 1:
        time.sleep(0.01)
    assert not (out / "metrics.jsonl").exists()  # still starting
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_RESUMABLE, stderr[-3000:]
    assert "stopped by SIGTERM after step 1" in stderr
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000001"]


FAKE_SRUN = """#!/usr/bin/env bash
# srun whose ranks, told to stop, end with mixed codes: one checkpoints (75), the other is killed (143).
echo $$ > "$FAKE_SLURM/srun.pid"
echo "$@" > "$FAKE_SLURM/srun.args"
trap 'exit 143' USR1
[[ -n ${RANKS_EXIT:-} ]] && exit "$RANKS_EXIT"
while :; do sleep 0.1; done
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_SLURM/calls"
kill -USR1 "$(cat "$FAKE_SLURM/srun.pid")" 2>/dev/null || true
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$FAKE_SLURM/calls" ;;
esac
"""


def _fake_job(tmp_path, **extra) -> tuple[subprocess.Popen, Path]:
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {**ENV, "FAKE_SLURM": str(fake), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-1", "SLURM_NTASKS": "2",
           "PATH": f"{fake}:{os.environ['PATH']}", **extra}
    job = subprocess.Popen(["bash", "launch/slurm.sbatch", "configs/tokenizer_tiny.yaml", str(tmp_path / "out")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return job, fake


def test_a_forwarded_stop_is_requeued_however_the_ranks_exit_codes_mix(tmp_path):
    job, fake = _fake_job(tmp_path)
    deadline = time.time() + 30
    while not (fake / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # a preemption, to the batch script
    text, _ = job.communicate(timeout=30)
    assert job.returncode == 143, text
    assert (fake / "calls").read_text().splitlines() == ["scancel --signal=USR1 77", "requeue 77"], text
    # A rank's exit must not end the others: all of them are checkpointing.
    assert "--kill-on-bad-exit=0" in (fake / "srun.args").read_text().split()


def test_ranks_that_fail_on_their_own_are_not_requeued(tmp_path):
    job, fake = _fake_job(tmp_path, RANKS_EXIT="1")
    text, _ = job.communicate(timeout=30)
    assert job.returncode == 1, text
    assert not (fake / "calls").exists(), text
