"""DeepSpeed's JIT-built CPU op (deepspeed_shm_comm) and the lock file torch's JIT build leaves when its builder is
killed (a rank stopped during start-up): once, every later start on the machine waited on it forever, silently."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semanticist_fast.engine.deepspeed_ops import remove_stale_lock

ROOT = Path(__file__).resolve().parents[1]
LOAD = """import logging, sys
logging.basicConfig(level=logging.WARNING)
from semanticist_fast.engine.deepspeed_ops import build_deepspeed_ops
build_deepspeed_ops(float(sys.argv[1]))
print("loaded")
"""


@pytest.fixture
def extensions(tmp_path):
    """(environment, build folder) of a private torch extensions folder (the user's stays untouched), seeded with
    the op as built already here, if it is (else the first load builds it: half a minute)."""
    pytest.importorskip("deepspeed")
    from torch.utils.cpp_extension import _get_build_directory

    root = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    folder = root / built.name  # under TORCH_EXTENSIONS_DIR, torch puts an op's folder right there
    if (built / "deepspeed_shm_comm.so").exists():
        shutil.copytree(built, folder, ignore=shutil.ignore_patterns("lock", "*.flock"))
    return env, folder


def _load(env, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, str(timeout_s)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_lock_left_by_a_killed_build_is_removed_and_the_op_loads(extensions):
    env, folder = extensions
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()  # what torch's FileBaton leaves when its holder is killed (torch would wait forever)
    r = _load(env, 120)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-3000:]
    assert f"removed {folder / 'lock'}" in r.stderr and "killed while building" in r.stderr
    assert not (folder / "lock").exists() and (folder / "deepspeed_shm_comm.so").exists()


def test_a_live_build_is_waited_for_then_a_deadline_names_the_lock(extensions):
    env, folder = extensions
    folder.mkdir(parents=True, exist_ok=True)
    # Another start on this machine, building: it holds our flock and has torch's lock file open.
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(folder / 'build.flock')!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
baton = os.open({str(folder / 'lock')!r}, os.O_CREAT | os.O_EXCL)
print("holding", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        r = _load(env, 2)
        assert r.returncode != 0 and "loaded" not in r.stdout
        message = r.stderr.strip().splitlines()[-1]
        assert "TimeoutError" in message and str(folder / "build.flock") in message, message
        assert f"open in pids {holder.pid}" in message, message
        assert (folder / "lock").exists()  # a live build's lock is left alone
        assert not remove_stale_lock(folder / "lock")  # open in a live process
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while time.time() < deadline and not remove_stale_lock(folder / "lock"):
        time.sleep(0.1)  # once the holder is gone it is stale
    assert not (folder / "lock").exists()
