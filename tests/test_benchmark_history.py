"""The benchmark results store, the report drawn from it, and the GPU suite's step runner (on stand-in commands)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common, report, store  # noqa: E402


def train_record(commit: str, device: str, images_per_s: float, mfu) -> dict:
    variant = {"images_per_s": images_per_s, "mfu": mfu}
    return {"benchmark": "bench_train", "date": f"2026120{commit[-1]}T000000Z", "commit": commit, "device": device,
            "device_kind": "cuda", "results": [{"workload": "tokenizer-L", "optimised": variant,
                                                 "plain": {"images_per_s": images_per_s / 2, "mfu": None},
                                                 "speedup": 2.0}]}


def test_store_appends_whole_lines_and_imports_each_record_once(tmp_path):
    path = tmp_path / "history.jsonl"
    store.append({"benchmark": "a", "date": "1", "x": 1}, path)
    store.append({"benchmark": "b", "date": "2", "x": [1, 2]}, path)
    assert [r["benchmark"] for r in store.read(path)] == ["a", "b"]
    assert len(path.read_text().splitlines()) == 2
    single = tmp_path / "old.json"
    single.write_text(json.dumps({"benchmark": "c", "date": "0", "commit": "abc", "device": "cpu"}, indent=2))
    other = tmp_path / "gpu.jsonl"
    store.append({"benchmark": "b", "date": "2", "x": [1, 2]}, other)  # already held
    store.append({"benchmark": "d", "date": "3"}, other)
    assert store.import_records([single, other], path) == 2
    assert store.import_records([single, other], path) == 0
    assert [r["benchmark"] for r in store.read(path)] == ["a", "b", "c", "d"]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"history.jsonl:5"):
        store.read(path)


def test_write_result_records_date_commit_and_a_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "STORE", tmp_path / "history.jsonl")
    monkeypatch.setenv("BENCH_RESULTS_COPY", str(tmp_path / "out" / "history-new.jsonl"))
    path = common.write_result("bench_x", {"device": "cpu", "device_kind": "cpu", "speedup": 1.5})
    assert path == tmp_path / "history.jsonl"
    (record,) = store.read(path)
    assert record["benchmark"] == "bench_x" and record["speedup"] == 1.5
    assert record["commit"] == common.git_commit() and len(record["date"]) == 16 and "torch" in record
    assert store.read(tmp_path / "out" / "history-new.jsonl") == [record]


def test_report_figures_plots_and_table(tmp_path):
    path = tmp_path / "history.jsonl"
    store.append(train_record("c1", "NVIDIA H100", 300.0, 0.40), path)
    store.append(train_record("c2", "NVIDIA H100", 330.0, 0.44), path)
    store.append({"benchmark": "bench_sample", "date": "20261203T000000Z", "commit": "c2", "device": "cpu",
                  "model": "random GPT-L", "ours": {"images_per_s": 16.0}, "naive": {"images_per_s": 6.0},
                  "speedup": 2.67}, path)
    quality = {"benchmark": "bench_quality", "date": "20261204T000000Z", "commit": "c3", "device": "cpu",
               "reconstruction": {"flat": {"psnr": 16.2}, "per_tokens": [{"tokens": 1, "psnr": 18.0, "ssim": 0.3},
                                                                         {"tokens": 8, "psnr": 20.5, "ssim": 0.6}]},
               "samples": {"accuracy": 0.95},
               "fid": {"reference_weights": False, "rfid": 1.0, "gfid": 2.0, "is_mean": 3.0}}
    store.append(quality, path)
    rows = report.figures(store.read(path)[1])
    assert ("train tokenizer-L optimised", "mfu_percent", 44.0) in rows
    assert ("train tokenizer-L optimised", "images_per_s", 330.0) in rows
    assert not any(s == "train tokenizer-L plain" and m == "mfu_percent" for s, m, _ in rows)  # unknown: left out
    q = report.figures(quality)
    assert ("tiny k=8", "psnr", 20.5) in q and ("tiny AR samples", "accuracy_percent", 95.0) in q
    assert not any(m in ("rfid", "gfid") for _, m, _ in q)  # a random Inception's FIDs are never plotted
    assert report.commit_order(store.read(path)) == ["c1", "c2", "c3"]
    assert report.series_by(store.read(path), {"mfu_percent"}) == {
        ("NVIDIA H100", "train tokenizer-L optimised", "mfu_percent"): {"c1": 40.0, "c2": 44.0}}

    report.main(["--store", str(path), "--out", str(tmp_path / "out")])
    for name in ("throughput.png", "quality.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| 20261204T000000Z | c3 | bench_quality | cpu | tiny k=8 | psnr | 20.5 |" in table


# ---- gpu_suite.sh, with a stand-in for python ----

STAND_IN = """#!/usr/bin/env bash
case "$*" in
  *bench_kernels.py*) echo "kernel bench broke"; exit 3 ;;
  *pytest*) sleep "${STAND_IN_TEST_SLEEP:-0}"; echo "tests ran" ;;
  *) echo "ran: $*" ;;
esac
"""


def suite(tmp_path, *args, **env):
    fake = tmp_path / "python"
    fake.write_text(STAND_IN)
    fake.chmod(0o755)
    full = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *args], capture_output=True,
                          text=True, env=full, cwd=ROOT)


def test_gpu_suite_is_valid_bash_and_lists_its_steps():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")]).returncode == 0
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("kernel_tests", "bench_kernels", "bench_train_tok", "bench_train_ar", "bench_sample_ar"):
        assert name in r.stdout
    assert "--preset tokenizer-L" in r.stdout and "--preset ar-L" in r.stdout and "--size L" in r.stdout
    # Issue 28's GPU-only checks, each a step that runs its tests on CUDA.
    for name, selects in (("gpu_one_cudart", "-k one_cuda_runtime"), ("gpu_zero_no_sync", "-k zero_step_adds_no"),
                          ("gpu_flash_compile", "-k flash_dispatch_under_fullgraph"),
                          ("gpu_bf16_sampling", "-k bf16_sampling_tracks_fp32"),
                          ("gpu_dali_built_once", "-k built_once and cuda"),
                          ("gpu_export_graphs", "-k bf16_export_replays_from_cuda_graphs")):
        line = next((row for row in r.stdout.splitlines() if row.startswith(name + " ")), "")
        assert selects in line and "-m pytest" in line, (name, r.stdout)


def test_gpu_suite_logs_a_failed_step_and_goes_on(tmp_path):
    r = suite(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tmp_path / "out" / "gpu_suite" / "summary.txt").read_text()
    lines = {line.split()[0]: line for line in summary.splitlines()[1:-1]}
    assert "FAILED (exit 3)" in lines["bench_kernels"]
    for name in ("kernel_tests", "bench_train_tok", "bench_train_ar", "bench_sample_ar"):
        assert " ok " in lines[name], summary  # the steps after the failure still ran
    assert "kernel bench broke" in (tmp_path / "out" / "gpu_suite" / "bench_kernels.log").read_text()


def test_gpu_suite_stops_a_step_at_the_budget(tmp_path):
    r = suite(tmp_path, "--only", "kernel_tests,bench_train_ar", GPU_SUITE_BUDGET_S="12", STAND_IN_TEST_SLEEP="60")
    assert r.returncode == 1
    summary = (tmp_path / "out" / "gpu_suite" / "summary.txt").read_text()
    # The step's limit is what is left of the 12 s budget when it starts (the suite's setup may take a second).
    limit = re.search(r"kernel_tests\s+TIMEOUT after (\d+)s", summary)
    assert limit and 10 <= int(limit.group(1)) <= 12, summary
    assert "skipped (suite budget spent)" in summary
    assert "bench_kernels" not in summary  # not in --only
