"""The signals that stop a training run, and how a run that is still starting keeps them instead of dying.

SIGTERM (a preemption, `scancel`) and SIGUSR1 (slurm's warning before the time limit, launch/slurm.sbatch) ask a
run to checkpoint at its next logging interval and exit with 75. Until the training loop listens, their default
action would end the process half-way through start-up (imports, the process group, a JIT build) with nothing
saved. So the CLI blocks them first thing: the kernel keeps one that comes pending (also for the compilers and workers
started meanwhile, which inherit the mask), and the loop receives it the moment it starts listening.
"""
import signal
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def hold() -> None:
    """Keep stop signals pending from here on. A launcher may start the process with them ignored (ignored ones are
    dropped, not kept): from here on they are kept."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)


@contextmanager
def listening(handler: Callable) -> Iterator[None]:
    """`handler(signum, frame)` receives stop signals, a pending one first, until the block ends; then they are
    handled (or held) as before. Main thread only."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in previous.items():
            signal.signal(s, h)
