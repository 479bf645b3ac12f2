"""The op DeepSpeed compiles on first use (on CPUs: its shared-memory collectives, `deepspeed_shm_comm`), built here
before the process group starts, so that a lock left by a killed build never hangs a run.

torch's JIT build (torch.utils.cpp_extension) guards an op's build folder with a file, `lock`, that its holder
removes when done, and it takes that file on every load, built or not. A process killed meanwhile (a rank stopped
during start-up) leaves it behind, and every later load of the op on that machine waits for it to vanish: forever,
silently. Here the processes of a machine build one at a time under a lock of our own, an flock, which the kernel
releases when its holder dies. Holding it, a `lock` file that no live process on this machine has open was left by
a dead builder: it is removed, with a warning naming it. Waiting has a deadline, and its error names the file.
"""
import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The builder deepspeed.comm.torch.build_shm_op loads when the process group starts.
SHM_BUILDER = "ShareMemCommBuilder"


def build_deepspeed_ops(timeout_s: float) -> None:
    """Build (or load) the op DeepSpeed is about to load, clearing a stale JIT lock first. DeepSpeed keeps the loaded
    op, so its own load in deepspeed.init_distributed takes no lock again."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed loads no op here (GPUs: NCCL needs none)
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    with _exclusive(folder / "build.flock", timeout_s, what=f"the JIT build of DeepSpeed's {builder.NAME}"):
        remove_stale_lock(folder / "lock")
        builder.load(verbose=False)


def remove_stale_lock(lock: Path) -> bool:
    """Remove torch's JIT-build lock file if no process on this machine has it open (its builder holds it open
    until done). The caller holds the flock every builder of ours takes, so no builder of ours is starting."""
    if not lock.exists():
        return False
    if _holders(lock):
        return False  # a live build (not one of ours): torch waits for it, as it should
    lock.unlink(missing_ok=True)
    log.warning("removed %s: a lock of DeepSpeed's JIT build left by a process killed while building (no process "
                "holds it); building again", lock)
    return True


def _holders(path: Path) -> list[int]:
    """The processes on this machine, other than this one, that have `path` open."""
    target, me, found = str(path.resolve()), str(os.getpid()), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found


class _exclusive:
    """An flock on `path`, waited for at most timeout_s; the error names the file and what holds it."""

    def __init__(self, path: Path, timeout_s: float, what: str):
        self.path, self.timeout_s, self.what = path, timeout_s, what

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holders = _holders(self.path)
                    os.close(self.fd)
                    raise TimeoutError(
                        f"waited {self.timeout_s:g} s (train.collective_timeout_s) for {self.path}, the lock of "
                        f"{self.what}, held by another process (open in pids "
                        f"{', '.join(map(str, holders)) or 'none on this machine: one on another machine sharing it'}"
                        "); end it if it hangs, or raise train.collective_timeout_s if the build is slow") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
