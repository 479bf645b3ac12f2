"""Stopping model work from outside its loops: a demo request past its deadline, or one whose client has gone.

    with stop_when(lambda: "past the deadline" if time.monotonic() > end else None):
        images = tokenizer.decode(tokens)   # raises Stopped("past the deadline") at its next network call

The diffusion samplers (the decoder's and the AR head's, eager and compiled alike) pass their network through
`stoppable`, so every network call first asks the innermost `stop_when` of the calling thread: work that nobody
waits for ends within one network call instead of running to its last step. The scope is per thread because a
server answers each request in a worker thread; outside any scope the check is one attribute read.
"""
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

Reason = Callable[[], Optional[str]]  # why to stop now, or None to go on

_scope = threading.local()


class Stopped(RuntimeError):
    """Model work stopped by the caller's `stop_when`; the message says why."""


@contextmanager
def stop_when(reason: Reason) -> Iterator[None]:
    outer = getattr(_scope, "reason", None)
    _scope.reason = reason
    try:
        yield
    finally:
        _scope.reason = outer


def check_stop() -> None:
    reason = getattr(_scope, "reason", None)
    if reason is not None:
        why = reason()
        if why:
            raise Stopped(why)


def stoppable(model_fn: Callable) -> Callable:
    """model_fn, asking the thread's stop_when before each call."""
    def call(*args, **kwargs):
        check_stop()
        return model_fn(*args, **kwargs)
    return call
