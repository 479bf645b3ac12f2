"""The benchmark results store, the report drawn from it, and the GPU suite's step runner (on stand-in commands)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common, figures, report, store  # noqa: E402


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
    monkeypatch.setattr(common, "git_state", lambda: ("abc1234", False))
    monkeypatch.setenv("BENCH_RESULTS_COPY", str(tmp_path / "out" / "history-new.jsonl"))
    path = common.write_result("bench_x", {"device": "cpu", "device_kind": "cpu", "speedup": 1.5})
    assert path == tmp_path / "history.jsonl"
    (record,) = store.read(path)
    assert record["benchmark"] == "bench_x" and record["speedup"] == 1.5
    assert record["commit"] == "abc1234" and record["dirty"] is False
    assert len(record["date"]) == 16 and "torch" in record
    assert store.read(tmp_path / "out" / "history-new.jsonl") == [record]


def test_a_dirty_tree_is_refused_unless_allowed_and_then_marked(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "STORE", tmp_path / "history.jsonl")
    monkeypatch.setattr(common, "git_state", lambda: ("abc1234", True))
    with pytest.raises(common.DirtyTree, match="--allow-dirty"):
        common.check_clean()
    with pytest.raises(common.DirtyTree):
        common.write_result("bench_x", {"device": "cpu"})
    assert not (tmp_path / "history.jsonl").exists()
    common.check_clean(no_write=True)  # nothing is recorded: nothing to refuse
    monkeypatch.setenv("BENCH_ALLOW_DIRTY", "1")
    common.check_clean()
    monkeypatch.delenv("BENCH_ALLOW_DIRTY")
    common.write_result("bench_x", {"device": "cpu"}, allow_dirty=True)
    (record,) = store.read(tmp_path / "history.jsonl")
    assert record["dirty"] is True and record["commit"] == "abc1234+dirty" and report.is_dirty(record)


def test_interleaved_alternates_the_variants_and_times_every_round():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    switched = []
    times = common.interleaved(variants, torch.device("cpu"), rounds=3, warmup=1,
                               before={"B": lambda: switched.append(len(calls))})
    assert "".join(calls) == "ABBAABBA"  # one warm-up round, then three; the first variant rotates
    assert switched == [1, 2, 5, 6]  # B's setup ran right before each of B's calls
    assert {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3} and all(t >= 0 for t in times["A"])
    three = []
    common.interleaved({n: (lambda n=n: three.append(n)) for n in "ABC"}, torch.device("cpu"), rounds=3, warmup=0)
    assert "".join(three) == "ABCBCACAB"
    with pytest.raises(ValueError, match="rounds"):
        common.interleaved(variants, torch.device("cpu"), rounds=0)


def test_ratio_stats_are_per_round():
    # Rounds of (baseline, candidate) seconds: per-round speed-ups 2, 4, 3, 4.
    stats = common.ratio_stats([2.0, 4.0, 6.0, 8.0], [1.0, 1.0, 2.0, 2.0])
    assert stats["per_round"] == [2.0, 4.0, 3.0, 4.0] and stats["rounds"] == 4
    assert stats["median"] == 3.5 and stats["min"] == 2.0 and stats["max"] == 4.0
    assert stats["q1"] == pytest.approx(2.75) and stats["q3"] == pytest.approx(4.0)
    # Not the ratio of medians or of bests: a slow round of the baseline alone counts once.
    assert common.ratio_stats([1.0, 1.0, 9.0], [1.0, 1.0, 1.0])["median"] == 1.0
    assert "x3.50" in common.format_ratio(stats) and "IQR x2.75-x4.00" in common.format_ratio(stats)
    with pytest.raises(ValueError):
        common.ratio_stats([1.0], [1.0, 2.0])


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
               "samples": {"accuracy": 0.95, "shape_accuracy": 0.4},
               "shape_probe": {"originals": 0.82, "reconstructions": [{"tokens": 1, "accuracy": 0.3},
                                                                      {"tokens": 8, "accuracy": 0.5}]},
               "fid": {"reference_weights": False, "rfid": 1.0, "gfid": 2.0, "is_mean": 3.0}}
    store.append(quality, path)
    rows = report.figures(store.read(path)[1])
    assert ("train tokenizer-L optimised", "mfu_percent", 44.0) in rows
    assert ("train tokenizer-L optimised", "images_per_s", 330.0) in rows
    assert not any(s == "train tokenizer-L plain" and m == "mfu_percent" for s, m, _ in rows)  # unknown: left out
    q = report.figures(quality)
    assert ("tiny k=8", "psnr", 20.5) in q and ("tiny AR samples", "accuracy_percent", 95.0) in q
    assert {("tiny shape probe originals", "accuracy_percent", 82.0),
            ("tiny shape probe reconstructions", "accuracy_percent", 50.0),
            ("tiny shape probe AR samples", "accuracy_percent", 40.0)} <= set(q)
    assert not any(m in ("rfid", "gfid") for _, m, _ in q)  # a random Inception's FIDs are never plotted
    # the 5-type probe (squares and diamonds told apart) is another series than the old 4 groups
    five = report.figures({**quality, "shape_probe": {**quality["shape_probe"], "types": ["discs"] * 5}})
    assert ("tiny shape type originals", "accuracy_percent", 82.0) in five
    assert not any(s.startswith("tiny shape probe") for s, _, _ in five)
    assert report.commit_order(store.read(path)) == ["c1", "c2", "c3"]
    assert report.series_by(store.read(path), {"mfu_percent"}) == {
        ("NVIDIA H100", "train tokenizer-L optimised", "mfu_percent"): {"c1": 40.0, "c2": 44.0}}

    report.main(["--store", str(path), "--out", str(tmp_path / "out")])
    for name in ("throughput.png", "quality.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "out" / "REPORT.md").read_text()
    assert "`bench_quality@20261204T000000Z`: commit c3, cpu" in table and "| tiny k=8 | psnr | 20.5 |  |" in table


def test_report_renders_every_record_of_the_store():
    records = store.read()
    kinds = {r["benchmark"] for r in records}
    assert {"bench_sample", "bench_train", "bench_data", "bench_scaling", "sampler_steps", "bench_quality",
            "tokenizer_ablation", "photo_tiles"} <= kinds
    table = report.markdown(records)
    for record in records:
        rows = report.figures(record)
        assert rows, f"{report.record_name(record)} has no figures in the report"
        assert f"`{report.record_name(record)}`" in table
        series, metric, value = rows[0]
        assert f"| {series} | {metric} | {value:.4g} |" in table
    for kind in kinds:
        assert f"### {kind}" in table
    dirty = [r for r in records if report.is_dirty(r)]
    assert all(f"`{report.record_name(r)}`: commit {r['commit']} (dirty)" in table for r in dirty)


def test_report_figures_of_the_interleaved_records():
    stats = common.ratio_stats([3.0, 3.0, 4.0], [1.0, 1.5, 1.0])
    sample = {"benchmark": "bench_sample", "date": "1", "model": "m", "ours": {"images_per_s": 8.0},
              "reference": {"images_per_s": 3.0}, "ours_vs_reference": stats, "max_abs_token_diff": 0.0}
    rows, spread = report.figures_and_spread(sample)
    assert ("sample m ours_vs_reference", "speedup", 3.0) in rows
    assert spread["sample m ours_vs_reference", "speedup"] == stats
    assert "IQR x2.50-x3.50, range x2.00-x4.00, 3 rounds" == report.format_spread(stats)
    unknown = {"benchmark": "gpu_step", "date": "2", "passed": True, "seconds": 4.0, "detail": {"n": 3}}
    assert report.figures(unknown) == [("gpu_step", "passed", 1.0), ("gpu_step", "seconds", 4.0),
                                       ("gpu_step detail", "n", 3.0)]


# ---- gpu_suite.sh, with a stand-in for python ----

STAND_IN = """#!/usr/bin/env bash
case "$*" in
  *suite_record.py*) echo "recorded: $*" ;;
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
    for name in ("kernel_tests", "cuda_graph_replay", "export_cuda", "bench_kernels", "bench_train_tok",
                 "bench_train_ar", "plan_check", "bench_sample_ar"):
        assert name in r.stdout
    # The GPU-only tests it runs exist (a renamed test would leave the step selecting nothing).
    source = (ROOT / "tests" / "test_export.py").read_text()
    for test in ("test_graphed_call_replays_and_writes_state_in_place",
                 "test_cuda_export_reproduces_eager_sampling_on_cuda",
                 "test_compiled_sampler_graphed_path_equals_ungraphed"):
        assert f"def {test}(" in source
    assert "-k graphed_call_replays" in r.stdout and "cuda_export_reproduces or graphed_path_equals" in r.stdout
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
    # Each step's outcome goes to the store through suite_record.py (the stand-in python only echoes the call).
    rows = [line.split("\t") for line in (tmp_path / "out" / "gpu_suite" / "steps.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == [n for n in lines if n in {r[0] for r in rows}] and len(rows) == len(lines)
    assert ["bench_kernels", "FAILED (exit 3)"] == rows[[r[0] for r in rows].index("bench_kernels")][:2]
    assert f"recorded: benchmarks/suite_record.py {tmp_path / 'out' / 'gpu_suite' / 'steps.tsv'}" in r.stdout


def test_suite_record_writes_each_step_pass_or_fail(tmp_path, monkeypatch):
    from benchmarks import suite_record

    monkeypatch.setattr(store, "STORE", tmp_path / "history.jsonl")
    monkeypatch.delenv("BENCH_RESULTS_COPY", raising=False)
    monkeypatch.setenv("BENCH_ALLOW_DIRTY", "1")  # as gpu_suite.sh sets it: the test must not depend on git status
    tsv = tmp_path / "steps.tsv"
    tsv.write_text("kernel_tests\tok\t41\t75\nexport_cuda\tFAILED (exit 1)\t80\t120\n"
                   "bench_data\tskipped (suite budget spent)\t0\t3\n")
    suite_record.main([str(tsv)])
    (record,) = store.read(tmp_path / "history.jsonl")
    assert record["benchmark"] == "gpu_suite" and record["passed"] == 1
    assert record["failed"] == ["export_cuda", "bench_data"]
    assert record["steps"][1] == {"step": "export_cuda", "status": "FAILED (exit 1)", "passed": False, "seconds": 80,
                                  "limit_s": 120}
    tsv.write_text("kernel_tests ok 41 75\n")
    with pytest.raises(ValueError, match="steps.tsv:1"):
        suite_record.main([str(tsv)])


def test_gpu_suite_stops_a_step_at_the_budget(tmp_path):
    r = suite(tmp_path, "--only", "kernel_tests,bench_train_ar", GPU_SUITE_BUDGET_S="12", STAND_IN_TEST_SLEEP="60")
    assert r.returncode == 1
    summary = (tmp_path / "out" / "gpu_suite" / "summary.txt").read_text()
    # The step's limit is what is left of the 12 s budget when it starts (the suite's setup may take a second).
    limit = re.search(r"kernel_tests\s+TIMEOUT after (\d+)s", summary)
    assert limit and 10 <= int(limit.group(1)) <= 12, summary
    assert "skipped (suite budget spent)" in summary
    assert "bench_kernels" not in summary  # not in --only


# ---- the READMEs' figures against the store ----

FIGURE_RECORDS = {
    "bench_sample@1": {"benchmark": "bench_sample", "date": "1", "commit": "c1", "dirty": False,
                       "ours_vs_reference": {"median": 2.364}, "ours": {"images_per_s": 17.5},
                       "rows": [{"batch": 1, "psnr": 18.44}, {"batch": 8, "psnr": 19.0}]},
    "photo_tiles@2": {"benchmark": "photo_tiles", "date": "2", "commit": "c2+dirty", "psnr": 21.41},
}


def test_figures_match_their_records():
    ok = ("ours x2.36<!--r:bench_sample@1 ours_vs_reference.median--> at 17.5 img/s<!--r:bench_sample@1--> "
          "and 19.00 dB<!--r:bench_sample@1 rows[batch=8].psnr--> (1844 %<!--r:bench_sample@1 rows.0.psnr*100-->)")
    assert figures.check_text(ok, FIGURE_RECORDS) == []
    assert figures.check_text("a flat 21.4<!--r!:photo_tiles@2--> (dirty)", FIGURE_RECORDS) == []
    table = "<!--r:bench_sample@1-->\n| batch | img/s | ratio |\n|---|---|---|\n| 1 | 17.5 | x2.36 |\n"
    assert figures.check_text(table, FIGURE_RECORDS) == []
    fenced = "<!--r:bench_sample@1-->\n```\n  18.44  19.00\n```\n"
    assert figures.check_text(fenced, FIGURE_RECORDS) == []


@pytest.mark.parametrize("text, problem", [
    ("x2.37<!--r:bench_sample@1 ours_vs_reference.median-->", "2.37 quoted"),  # another figure
    ("x2.4<!--r:bench_sample@1 ours_vs_reference.median--> x2.36", "'x2.36' names no record"),  # one unnamed
    ("20 img/s, or so", "'20 img/s' names no record"),
    ("x2.36<!--r:bench_sample@9 ours_vs_reference.median-->", "no record bench_sample@9"),
    ("x2.36<!--r:bench_sample@1 ours.median-->", "no 'median'"),
    ("19.0<!--r:bench_sample@1 rows[batch=2].psnr-->", "0 items with batch=2"),
    ("a flat 21.4<!--r:photo_tiles@2-->", "dirty tree"),  # a dirty record cited as if clean
    ("<!--r:bench_sample@1-->\n| batch | img/s |\n|---|---|\n| 1 | 17.6 |\n", "17.6 in the block"),
    ("<!--r:bench_sample@1-->\n```\n  18.45\n```\n", "18.45 in the block"),
])
def test_figures_that_differ_or_name_nothing_are_reported(text, problem):
    problems = figures.check_text(text, FIGURE_RECORDS)
    assert any(problem in p for p in problems), problems


def test_the_readmes_quote_only_recorded_figures():
    assert figures.check() == []


def test_bench_sample_times_the_reference_sampler_in_turns_with_ours():
    from benchmarks import bench_sample

    record = bench_sample.main(["--batch", "2", "--head-steps", "3", "--repeats", "2", "--no-cache", "--no-write",
                                "--device", "cpu"])
    assert set(record["variants"]) == {"reference", "ours", "no_cache"}
    assert "twice per SDE step" in record["variants"]["reference"] and "not a baseline" in record["variants"]["no_cache"]
    for name in ("reference", "ours", "no_cache"):
        assert len(record[name]["all_seconds"]) == 2
    stats = record["ours_vs_reference"]
    assert stats["rounds"] == 2 and stats["min"] <= stats["median"] <= stats["max"]
    assert stats["per_round"] == [r / o for r, o in zip(record["reference"]["all_seconds"],
                                                        record["ours"]["all_seconds"])]
    assert record["max_abs_token_diff"] < 1e-5  # the same noise: the reference's sampler draws the same tokens
