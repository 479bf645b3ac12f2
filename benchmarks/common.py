"""Shared bits of the benchmarks: interleaved timing and its ratio statistics, the device, and the one way to record
a result (refused from a dirty tree unless asked for).

Every comparison runs its variants in turns (A B, B A, A B, ...: each round calls every variant once, the first
variant of a round rotating), so a burst of load from elsewhere on a shared machine hits every side alike. A ratio is
reported per round (baseline seconds / candidate seconds of that round) and summarised by its median and spread.
"""
import argparse
import datetime
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from statistics import median
from typing import Callable, Mapping, Optional

import torch

from benchmarks import store

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of each repeat, after warmup (device-synchronised). One variant alone: to compare
    variants, use interleaved()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def cpu_seconds() -> float:
    """CPU seconds of this process and its (waited-for) children, e.g. DataLoader workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleaved(variants: Mapping[str, Callable[[], object]], device: torch.device, rounds: int,
                warmup: int = 1, before: Optional[Mapping[str, Callable[[], None]]] = None,
                cpu: Optional[dict] = None) -> dict[str, list[float]]:
    """{name: wall seconds of each round} for variants timed in turns: `warmup` untimed rounds, then `rounds`
    rounds in which every variant runs once, round r starting at variant r mod len(variants) (A B, B A for two).
    before: optional per-variant setup run untimed right before each of its calls (e.g. switching a global flag).
    cpu: a dict to fill with {name: CPU seconds of each round} as well (on a busy CPU they say more than the wall
    clock)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(variants)
    before = before or {}
    times = {name: [] for name in names}
    if cpu is not None:
        cpu.update({name: [] for name in names})
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in before:
                before[name]()
            sync(device)
            cpu_start, start = cpu_seconds(), time.perf_counter()
            variants[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu[name].append(cpu_seconds() - cpu_start)
    return times


def _quartiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if len(ordered) < 2:
        return ordered[0], ordered[0]

    def at(q: float) -> float:  # linear interpolation between order statistics
        x = q * (len(ordered) - 1)
        lo = int(x)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)

    return at(0.25), at(0.75)


def ratio_stats(baseline: list[float], candidate: list[float]) -> dict:
    """The speed-up of candidate over baseline, from per-round pairs of seconds (same round = same load):
    {"median", "min", "max", "q1", "q3", "rounds", "per_round"}; > 1 means the candidate is faster."""
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"ratio_stats needs equal, non-empty rounds: {len(baseline)} vs {len(candidate)}")
    ratios = [b / c for b, c in zip(baseline, candidate)]
    q1, q3 = _quartiles(ratios)
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "q1": q1, "q3": q3,
            "rounds": len(ratios), "per_round": ratios}


def variant_summary(seconds: list[float], items: float, unit: str = "images_per_s") -> dict:
    """Absolute figures of one variant: median seconds per call, `items` per call over it, every round's seconds."""
    mid = median(seconds)
    return {"seconds": mid, unit: items / mid, "all_seconds": seconds}


def format_ratio(stats: dict) -> str:
    return (f"x{stats['median']:.2f} (median of {stats['rounds']} rounds; IQR x{stats['q1']:.2f}-x{stats['q3']:.2f}, "
            f"range x{stats['min']:.2f}-x{stats['max']:.2f})")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_state() -> tuple[str, bool]:
    """(HEAD's short hash, whether tracked files differ from it). The results (benchmarks/results/, where each run
    appends) do not count. ("unknown", False) outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results")
        return head, bool(changed)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def git_commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it (the figures then belong to no commit)."""
    head, dirty = git_state()
    return head + "+dirty" if dirty else head


class DirtyTree(SystemExit):
    pass


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """--no-write and --allow-dirty, the same in every benchmark."""
    parser.add_argument("--no-write", action="store_true", help="print only; do not record the result")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record even though tracked files differ from HEAD (the record is marked dirty)")


def check_clean(allow_dirty: bool = False, no_write: bool = False) -> None:
    """Refuses (before any measuring) to record from a tree whose tracked files differ from HEAD: such figures
    belong to no commit. Call at a benchmark's start with its --allow-dirty and --no-write. BENCH_ALLOW_DIRTY=1 in
    the environment allows it too (for a suite of benchmarks, e.g. on a lent GPU whose time must not be lost)."""
    if no_write or allow_dirty or os.environ.get("BENCH_ALLOW_DIRTY") == "1":
        return
    head, dirty = git_state()
    if dirty:
        raise DirtyTree(f"tracked files differ from {head} (git status): commit first so the record names the code "
                        "it measured, or pass --allow-dirty (the record is then marked dirty) or --no-write")


def write_result(name: str, record: dict, allow_dirty: bool = False) -> Path:
    """Appends the record to the results store (benchmarks/store.py) with the benchmark's name, the UTC date, the
    git commit, whether the tree was dirty and the torch version; returns the store's path. Refused from a dirty
    tree unless allow_dirty. If BENCH_RESULTS_COPY is set (gpu_suite.sh sets it to $OUT), the record is appended
    to that file too, so that a lent machine's results come back."""
    check_clean(allow_dirty)
    head, dirty = git_state()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {"benchmark": name, "date": stamp, "commit": head + "+dirty" if dirty else head, "dirty": dirty,
              "torch": torch.__version__, **record}
    path = store.append(record)
    if os.environ.get("BENCH_RESULTS_COPY"):
        store.append(record, Path(os.environ["BENCH_RESULTS_COPY"]))
    return path
