"""Writes the GPU suite's outcome, each step's pass / fail, to the results store as a `gpu_suite` record.

    python benchmarks/suite_record.py STEPS_TSV      # gpu_suite.sh calls this at its end

STEPS_TSV holds one line per step: name, status ("ok", "FAILED (exit N)", "TIMEOUT after Ns", "skipped ..."),
seconds taken and the step's time limit, tab-separated. The record keeps them in order with `passed` (status ok),
so a failed or skipped check is on file beside the figures of the same run.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import describe_device, write_result  # noqa: E402


def read_steps(path: Path) -> list[dict]:
    steps = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected name, status, seconds, limit (tab-separated), got {line!r}")
        name, status, seconds, limit = fields
        steps.append({"step": name, "status": status, "passed": status == "ok", "seconds": int(seconds),
                      "limit_s": int(limit)})
    return steps


def suite_record(steps: list[dict]) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"device": describe_device(device), "device_kind": device.type, "steps": steps,
            "passed": sum(s["passed"] for s in steps), "failed": [s["step"] for s in steps if not s["passed"]]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", type=Path, help="the suite's steps.tsv")
    args = p.parse_args(argv)
    record = suite_record(read_steps(args.steps))
    print("wrote", write_result("gpu_suite", record))
    return record


if __name__ == "__main__":
    main()
