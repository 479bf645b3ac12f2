"""`semanticist-fast plan` held to a measured run: the planner's memory and speed for the workloads bench_train just
timed, beside what bench_train measured, as one `plan_check` record.

bench_train times one process training tokenizer-L (batch 64) and AR-L (batch 256) without the frozen encoders; the
plan of the matching published config (configs/tokenizer_l.yaml, configs/autoregressive_l.yaml) on one process at
that batch predicts the same step's peak memory less its frozen models. Speed: the plan at the assumed MFU (what a
user sees before any record exists) against bench_train's measured images/s and MFU (what later plans use).
The ratios are recorded, not judged: the first GPU session learns how far the planner is off.

    python benchmarks/plan_check.py                # newest bench_train record of this machine's device
    python benchmarks/plan_check.py --gpu h200     # the plan's GPU kind (default: from the record's device)
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, add_record_arguments, check_clean, write_result  # noqa: E402
from semanticist_fast.config import load_config  # noqa: E402
from semanticist_fast.plan.hardware import GPUS  # noqa: E402
from semanticist_fast.plan.planner import ASSUMED_MFU, make_plan  # noqa: E402
from semanticist_fast.tasks import spec_for_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tokenizer-L": "configs/tokenizer_l.yaml", "ar-L": "configs/autoregressive_l.yaml"}


def newest_bench_train(store: Path, device_kind: str) -> dict:
    found = None
    for line in store.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("benchmark") == "bench_train" and record.get("device_kind") == device_kind and \
                any(row.get("workload") in CONFIGS for row in record.get("results", [])):
            found = record
    if found is None:
        raise SystemExit(f"no bench_train record of tokenizer-L or ar-L on a {device_kind} in {store}: run "
                         "benchmarks/bench_train.py --preset tokenizer-L (and --preset ar-L) first")
    return found


def gpu_kind(device: str) -> str:
    """The planner's GPU key named in a record's device text (e.g. "NVIDIA H200" -> "h200")."""
    text = device.lower()
    named = [(len(gpu.name), key) for key, gpu in GPUS.items() if gpu.name.lower() in text]
    if named:
        return max(named, key=lambda n: n[0])[1]  # "H100 PCIe" before "H100"; the first of equal names
    raise SystemExit(f"the record's device {device!r} is none of the planner's GPUs ({', '.join(GPUS)}): "
                     "give --gpu")


def check_row(row: dict, gpu: str) -> dict:
    config = CONFIGS[row["workload"]]
    batch = row["batch"]
    run = load_config(spec_for_file(config).run_config, str(ROOT / config),
                      ["train.engine=single", f"train.batch_size={batch}", f"train.micro_batch_size={batch}"])
    plan = make_plan(run, gpus=1, gpu=gpu, mfu=ASSUMED_MFU)
    memory = plan["memory"]
    predicted_bytes = memory["peak"] - memory["frozen_models"]  # bench_train runs no frozen encoder
    predicted_ips = plan["time"]["images_per_s"] * plan["flops_per_image"]["step"] / row["trained_flops_per_image"]
    out = {"workload": row["workload"], "config": config, "batch": batch,
           "predicted_peak_bytes": predicted_bytes, "predicted_images_per_s_at_assumed_mfu": predicted_ips,
           "assumed_mfu": ASSUMED_MFU}
    for variant in ("optimised", "plain"):
        measured = row.get(variant, {})
        if measured.get("peak_memory_bytes"):
            out[f"{variant}_peak_bytes"] = measured["peak_memory_bytes"]
            out[f"{variant}_memory_ratio"] = predicted_bytes / measured["peak_memory_bytes"]
        if measured.get("images_per_s"):
            out[f"{variant}_images_per_s"] = measured["images_per_s"]
            out[f"{variant}_mfu"] = measured.get("mfu")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=RESULTS / "history.jsonl")
    p.add_argument("--device-kind", default="cuda", help="which records to check (device_kind of bench_train)")
    p.add_argument("--gpu", default=None, help="the planner's GPU kind; default: named in the record's device")
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    record = newest_bench_train(args.store, args.device_kind)
    gpu = args.gpu or gpu_kind(record["device"])
    rows = [check_row(row, gpu) for row in record["results"] if row.get("workload") in CONFIGS]
    result = {"bench_train": f"bench_train@{record['date']}", "gpu": gpu, "results": rows}
    for row in rows:
        print(f"{row['workload']}: peak memory planned {row['predicted_peak_bytes'] / 2 ** 30:.2f} GiB, measured "
              + ", ".join(f"{v} {row[f'{v}_peak_bytes'] / 2 ** 30:.2f} GiB (plan x{row[f'{v}_memory_ratio']:.2f})"
                          for v in ("optimised", "plain") if f"{v}_peak_bytes" in row))
    if not args.no_write:
        write_result("plan_check", result, allow_dirty=args.allow_dirty)
    return result


if __name__ == "__main__":
    main()
