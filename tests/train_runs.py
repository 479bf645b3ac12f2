"""Trains several tiny tokenizer runs one after another in the same launched processes (torchrun starts this
file), so that many engine settings cost one start-up of torch and DeepSpeed instead of one each.

    python -m torch.distributed.run --nproc_per_node 2 tests/train_runs.py JOBS.json

JOBS.json: a list of {"out": DIR, "overrides": [key=value, ...], "resume": bool}, on the tiny tokenizer config.
"""
import json
import sys
from pathlib import Path

from semanticist_fast.config import load_config
from semanticist_fast.tasks import train
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        run = load_config(TokenizerRun, "configs/tokenizer_tiny.yaml", job["overrides"])
        train(run, Path(job["out"]), resume=job.get("resume", False))


if __name__ == "__main__":
    main(sys.argv[1])
