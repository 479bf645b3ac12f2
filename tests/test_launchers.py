"""The launch scripts run for real on this host: launch/deepspeed.sh with 2 CPU ranks and launch/torchrun.sh as two
agents (two "nodes" on loopback). Killing a launcher with SIGKILL ends its ranks within seconds (they die with it:
common/launcher.py), the other node's rank exits within the collective deadline, and the same command resumes the
run to the losses and weights of an uninterrupted single process."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import MICRO_TOKENIZER, micro_tokenizer_run
from semanticist_fast.common.runs import list_checkpoints, read_meta
from semanticist_fast.tasks import train
from test_distributed import ENV, ROOT, _port, assert_same_run

STEPS = 160  # 20 epochs of 8 steps: a few seconds on 2 ranks, time enough to kill a launcher mid-run
DEADLINE_S = 20
RUN = [*MICRO_TOKENIZER, "train.epochs=20", "train.ckpt_every=8", "train.keep_checkpoints=0",
       f"train.collective_timeout_s={DEADLINE_S}"]
# Over 160 steps the attention key biases (a gradient of pure rounding noise, see assert_same_run) drift by up to
# ~3e-4 between reduction orders; every other weight agrees to ~5e-7.
WEIGHTS_ATOL = 1e-3
SCRIPT_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), ENV.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch_reference")
    train(micro_tokenizer_run(*RUN[len(MICRO_TOKENIZER):]), out)
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, found, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def start(script: str, out: Path, env: dict) -> subprocess.Popen:
    # The script execs its launcher: the Popen's pid is the launcher's.
    return subprocess.Popen(["bash", script, "configs/tokenizer_tiny.yaml", str(out), *RUN], cwd=ROOT,
                            env={**SCRIPT_ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_all(procs: list[subprocess.Popen], others: list[int]) -> None:
    """Leave nothing behind when a test fails: the launchers and the ranks this test started, by pid."""
    for pid in [p.pid for p in procs] + others:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)


def start_agents(script: str, out: Path, env: dict, count: int) -> list[subprocess.Popen]:
    """`count` launchers with the same command. Two torchrun agents on one host both see themselves as the
    rendezvous host (MASTER_ADDR is theirs) and race to start its store; on a cluster the agents are on different
    hosts, so the test starts the second once the first one's store listens, as a slower node would."""
    procs = [start(script, out, env)]
    if count > 1:
        port = int(env["MASTER_PORT"])
        wait_until(lambda: _listening(port) or procs[0].poll() is not None, 60)
        procs += [start(script, out, env) for _ in range(count - 1)]
    return procs


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def relaunch(script: str, out: Path, env: dict, count: int = 1) -> None:
    procs = start_agents(script, out, env, count)
    try:
        results = [p.communicate(timeout=400)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(r[-6000:] for r in results)
    finally:
        kill_all(procs, [])


def first_checkpoint(out: Path, procs: list[subprocess.Popen]) -> None:
    assert wait_until(lambda: list_checkpoints(out) or any(p.poll() is not None for p in procs), 300)
    assert all(p.poll() is None for p in procs), [p.stderr.read()[-3000:] for p in procs if p.poll() is not None]


def test_deepspeed_launcher_on_2_cpu_ranks_dies_with_its_ranks_and_resumes(reference, tmp_path):
    out = tmp_path / "run"
    env = {"NUM_GPUS": "2", "MASTER_PORT": str(_port())}
    launcher = start("launch/deepspeed.sh", out, env)
    ranks: list[int] = []
    try:
        first_checkpoint(out, [launcher])
        ranks = descendants(launcher.pid)  # deepspeed.launcher.launch and, under it, the 2 ranks
        assert len(ranks) == 3, ranks
        launcher.kill()
        launcher.wait(timeout=30)
        assert wait_until(lambda: not any(alive(pid) for pid in ranks), 15), "ranks outlived the launcher"
    finally:
        kill_all([launcher], ranks)
    assert read_meta(list_checkpoints(out)[-1])["step"] < STEPS, "the run finished before the kill"
    relaunch("launch/deepspeed.sh", out, env)
    meta = read_meta(list_checkpoints(out)[-1])
    assert (meta["step"], meta["world_size"]) == (STEPS, 2)
    assert_same_run(reference, out, atol=WEIGHTS_ATOL)


def test_torchrun_two_agents_one_killed_the_other_exits_and_the_run_resumes(reference, tmp_path):
    out = tmp_path / "run"
    env = {"NUM_NODES": "2", "NPROC_PER_NODE": "1", "MASTER_PORT": str(_port()), "RUN_ID": tmp_path.name}
    agents = start_agents("launch/torchrun.sh", out, env, 2)
    ranks: list[int] = []
    try:
        first_checkpoint(out, agents)
        killed, survivor = agents
        ranks = [descendants(a.pid) for a in agents]
        assert [len(r) for r in ranks] == [1, 1], ranks
        killed.kill()
        killed_at = time.time()
        assert wait_until(lambda: not alive(ranks[0][0]), 15), "the killed agent's rank went on"
        survivor.wait(timeout=DEADLINE_S + 60)
        took = time.time() - killed_at
        stderr = survivor.stderr.read()
        assert survivor.returncode != 0 and not alive(ranks[1][0]), stderr[-3000:]
        assert took < DEADLINE_S + 30, took  # the collective deadline plus the agent's own shutdown
    finally:
        kill_all(agents, [pid for r in ranks for pid in r])
    assert read_meta(list_checkpoints(out)[-1])["step"] < STEPS, "the run finished before the kill"
    relaunch("launch/torchrun.sh", out, env, count=2)
    meta = read_meta(list_checkpoints(out)[-1])
    assert (meta["step"], meta["world_size"]) == (STEPS, 2)
    assert_same_run(reference, out, atol=WEIGHTS_ATOL)


# ---- common/launcher.py on its own (no torch: a parent that starts a child and is killed) ----

CHILD = ("import sys, time; from semanticist_fast.common.launcher import die_with_launcher; die_with_launcher(); "
         "print('up', flush=True); time.sleep(120)")
PARENT = ("import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
          "start_new_session=True); print(p.pid, flush=True); p.wait()")


@pytest.mark.parametrize("launched", [True, False], ids=["launched", "plain"])
def test_a_child_dies_with_its_parent_only_when_a_launcher_started_it(launched):
    env = {k: v for k, v in SCRIPT_ENV.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID",
                                                             "SEMANTICIST_LAUNCHER_PID")}
    if launched:
        env["TORCHELASTIC_RUN_ID"] = "test"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "up"  # the child shares the parent's stdout
        parent.kill()
        parent.wait(timeout=30)
        assert wait_until(lambda: not alive(child), 10 if launched else 2) == launched
    finally:
        kill_all([parent], [child])


def test_a_rank_whose_named_launcher_is_gone_exits_at_once():
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = {**SCRIPT_ENV, "SEMANTICIST_LAUNCHER_PID": f"{gone.pid}@{socket.gethostname()}"}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "up" not in r.stdout, r.stdout + r.stderr
    assert f"the launcher (pid {gone.pid}) is gone" in r.stderr
