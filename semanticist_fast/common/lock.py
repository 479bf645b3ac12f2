"""One training run per run directory: an exclusive lock on RUN/.lock for the life of the run.

The lock is a flock, so the kernel releases it when the process ends, however it ends: a crashed run leaves
nothing that blocks the next one, and no PID is guessed at. The file says who holds it (host, pid, start time,
command), for the message a second run gets. It holds across processes of one host, and on network file systems
that Linux maps flock onto (NFS, Lustre with flock enabled, GPFS); the holder is the rank-0 process.
"""
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


class RunLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
                                 "finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays, naming the last holder
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
