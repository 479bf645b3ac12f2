"""Shared bits of the benchmarks: timing, device description, and the one way to record a result."""
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from benchmarks import store

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of each repeat, after warmup (device-synchronised)."""
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


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it (the figures then belong to no commit); the
    results themselves (benchmarks/results/, where each run appends) do not count."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results")
        return head + "+dirty" if changed else head
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, record: dict) -> Path:
    """Appends the record to the results store (benchmarks/store.py) with the benchmark's name, the UTC date, the
    git commit and the torch version; returns the store's path. If BENCH_RESULTS_COPY is set (gpu_suite.sh sets
    it to $OUT), the record is appended to that file too, so that a lent machine's results come back."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {"benchmark": name, "date": stamp, "commit": git_commit(), "torch": torch.__version__, **record}
    path = store.append(record)
    if os.environ.get("BENCH_RESULTS_COPY"):
        store.append(record, Path(os.environ["BENCH_RESULTS_COPY"]))
    return path
