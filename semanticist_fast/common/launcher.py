"""Ranks end with the launcher that started them.

torchrun starts its workers in sessions of their own, and the deepspeed launcher's workers are grandchildren of
the `deepspeed` command; killing either launcher with SIGKILL (an out-of-memory kill, a scheduler giving up on
it) used to leave the ranks training on, holding the run lock, so the relaunched command was refused.

`die_with_launcher` runs first thing in a process a launcher started: the kernel sends it SIGKILL when its parent
exits (PR_SET_PDEATHSIG), and when launch/*.sh named the launcher's pid in SEMANTICIST_LAUNCHER_PID (the deepspeed
runner, which is not the parent), a thread waits on that process and ends this one when it is gone. A hard end
loses at most the steps since the last checkpoint, which is what a killed launcher means; the atomic checkpoints
stay readable and the same command resumes.
"""
import ctypes
import os
import select
import signal
import socket
import sys
import threading
from typing import Optional

LAUNCHER_PID_ENV = "SEMANTICIST_LAUNCHER_PID"  # "PID@HOST", set by launch/*.sh
_PR_SET_PDEATHSIG = 1
# torchrun sets TORCHELASTIC_RUN_ID, the deepspeed launcher LOCAL_RANK; both set it for every rank they start.
_LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", LAUNCHER_PID_ENV)


def started_by_launcher() -> bool:
    return any(os.environ.get(name) for name in _LAUNCHER_MARKS)


def _gone(what: str) -> None:
    print(f"error: {what} is gone: this rank stops (continue with the same command; it resumes from the newest "
          "checkpoint)", file=sys.stderr, flush=True)
    os._exit(1)


def named_launcher() -> Optional[int]:
    """The pid in SEMANTICIST_LAUNCHER_PID when it names a process of this host (a launcher on another node
    cannot be watched from here)."""
    value = os.environ.get(LAUNCHER_PID_ENV, "")
    pid, _, host = value.partition("@")
    if not pid.isdigit() or (host and host != socket.gethostname()):
        return None
    return int(pid)


def die_with_launcher() -> None:
    """End this process when its launcher ends (Linux; a no-op elsewhere and for a process no launcher started)."""
    if not sys.platform.startswith("linux") or not started_by_launcher():
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this rank will not "
              "end with its launcher", file=sys.stderr)
    elif os.getppid() != parent:  # the parent died before the request took effect: no signal will come
        _gone(f"the launcher (pid {parent})")
    launcher = named_launcher()
    if launcher is not None and launcher != os.getppid():
        _watch(launcher)


def _watch(pid: int) -> None:
    """A daemon thread that ends this process once `pid` has exited (a pidfd turns readable then, reaped or not)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _gone(f"the launcher (pid {pid})")
    except OSError:  # no pidfd (Linux < 5.3): look every second; a zombie counts as gone
        def poll() -> None:
            while _alive(pid):
                threading.Event().wait(1.0)
            _gone(f"the launcher (pid {pid})")
    else:
        def poll() -> None:
            select.select([fd], [], [])
            _gone(f"the launcher (pid {pid})")
    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
