"""Plots and Markdown tables of the results store (benchmarks/results/history.jsonl): every record of every kind.

    python benchmarks/report.py                  # writes benchmarks/results/{throughput,quality}.png and REPORT.md
    python benchmarks/report.py --check          # also: every figure the READMEs quote matches its record

- throughput.png: training images/s (bench_train: optimised and plain eager, each workload) and sampling images/s
  (bench_sample: ours, the reference's sampler, and older records' baselines), one line per device; MFU of the
  training steps where it is known (a GPU with a known peak);
- quality.png: the tiny tokenizer's held-out PSNR for each k and the flat baseline, the tiny AR model's samples in
  their class by hue (bench_quality), and rFID / gFID, only from torch-fidelity's Inception weights;
- REPORT.md: each series' newest figure, then every record, grouped by benchmark, newest first, each named
  `benchmark@date` (the name the READMEs' figures cite, see benchmarks/figures.py), its commit and whether the
  tree was dirty; speed-ups measured in turns carry their spread over the rounds.
Commits are ordered by the date of their first record.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import store  # noqa: E402
from semanticist_fast.common.files import atomic_write, atomic_write_text  # noqa: E402


def record_name(record: dict) -> str:
    """How the READMEs and REPORT.md cite a record: benchmark@date."""
    return f"{record.get('benchmark')}@{record.get('date')}"


def is_dirty(record: dict) -> bool:
    return bool(record.get("dirty")) or str(record.get("commit", "")).endswith("+dirty")


def _stats(value) -> dict:
    return value if isinstance(value, dict) and "median" in value else {}


def _sample_figures(record: dict) -> tuple[list, dict]:
    rows, spread = [], {}
    model = record.get("model", "")
    if record.get("mode") == "compiled":
        b = f"sample compiled b{record.get('batch')}"
        if "end_to_end" in record:  # interleaved, with the reference's sampler as the baseline
            for part in ("end_to_end", "tokens"):
                runs = record[part]
                for variant in ("reference", "eager", "compiled"):
                    rows.append((f"{b} {part} {variant}", "images_per_s", runs.get(variant, {}).get("images_per_s")))
                for pair in ("compiled_vs_reference", "compiled_vs_eager", "eager_vs_reference"):
                    rows.append((f"{b} {part} {pair}", "speedup", _stats(runs.get(pair)).get("median")))
                    spread[f"{b} {part} {pair}", "speedup"] = _stats(runs.get(pair))
        else:  # before issue 24: compiled against our eager sampler only, best of repeats
            for variant in ("eager", "compiled"):
                rows.append((f"{b} end_to_end {variant}", "images_per_s", record.get(variant, {}).get("images_per_s")))
            rows.append((f"{b} end_to_end compiled_vs_eager", "speedup", record.get("speedup_end_to_end")))
            rows.append((f"{b} tokens compiled_vs_eager", "speedup", record.get("speedup_tokens")))
        rows.append((b, "max_abs_image_diff", record.get("max_abs_image_diff")))
    elif "ours_vs_reference" in record:
        for variant in ("ours", "reference", "no_cache"):
            if variant in record:
                rows.append((f"sample {model} {variant}", "images_per_s", record[variant].get("images_per_s")))
        for pair in ("ours_vs_reference", "reference_vs_no_cache"):
            if pair in record:
                rows.append((f"sample {model} {pair}", "speedup", record[pair]["median"]))
                spread[f"sample {model} {pair}", "speedup"] = record[pair]
        rows.append((f"sample {model}", "max_abs_token_diff", record.get("max_abs_token_diff")))
    else:  # before issue 24: against the no-cache sampler (not the reference's), one variant after the other
        for variant in ("ours", "naive"):
            rows.append((f"sample {model} {variant}", "images_per_s", record.get(variant, {}).get("images_per_s")))
        rows.append((f"sample {model} ours_vs_no_cache", "speedup", record.get("speedup")))
    return rows, spread


def _data_figures(record: dict) -> tuple[list, dict]:
    rows, spread = [], {}
    for kind, r in record.get("decode", {}).items():
        if isinstance(r, dict) and "dali_over_pil" in r:
            for variant in ("pil", "dali"):
                rows.append((f"data {kind} {variant}", "images_per_s", r.get(f"{variant}_images_per_s")))
            rows.append((f"data {kind} dali_over_pil", "speedup", r["dali_over_pil"]))
            rows.append((f"data {kind} dali_over_pil per CPU s", "speedup", r.get("dali_over_pil_cpu")))
            spread[f"data {kind} dali_over_pil", "speedup"] = _stats(r.get("dali_over_pil_stats"))
            spread[f"data {kind} dali_over_pil per CPU s", "speedup"] = _stats(r.get("dali_over_pil_cpu_stats"))
    decode = record.get("decode", {})
    rows.append(("data scan", "files_per_s", decode.get("scan_files_per_s")))
    for regime, r in decode.get("tolerance_random_crop_flip", {}).items():
        rows.append((f"data DALI - PIL {regime}", "mean_abs_0_255", r["mean_abs"]))
        rows.append((f"data DALI - PIL {regime}", "worst_mean_abs_0_255", r["worst_mean_abs"]))
        rows.append((f"data DALI - PIL {regime}", "max_abs_0_255", r["max_abs"]))
    t = record.get("train")
    if t:
        for variant in ("online", "cached"):
            rows.append((f"data train {t.get('preset')} {variant}", "images_per_s", t.get(f"{variant}_images_per_s")))
        rows.append((f"data train {t.get('preset')} cached_over_online", "speedup", t.get("cached_over_online")))
        key = f"data train {t.get('preset')} cached_over_online"
        spread[key, "speedup"] = _stats(t.get("cached_over_online_stats"))
    return rows, spread


def _scaling_figures(record: dict) -> tuple[list, dict]:
    rows, spread = [], {}
    m = record.get("measured")
    if m:
        rows.append(("scaling 1 rank", "images_per_s", m["one_rank"]["images_per_s"]))
        rows.append(("scaling 2 ranks", "images_per_s", m["two_ranks"]["images_per_s"]))
        rows.append(("scaling 2 ranks over 1", "speedup", m["ratio_2_over_1"]))
        spread["scaling 2 ranks over 1", "speedup"] = _stats(m.get("ratio_2_over_1_stats"))
    for r in record.get("model", []):
        for zero in ("zero2", "zero3"):
            rows.append((f"scaling model {r['workload']} {r['gpus']} GPUs {zero}", "efficiency_percent",
                         100 * r[zero]["efficiency"]))
    return rows, spread


def _sampler_steps_figures(record: dict) -> list:
    rows = []
    for r in record.get("rows", []):
        series = f"steps {r['part']} {r['sampler']}"
        for key, value in r.items():
            if key.startswith("psnr"):
                rows.append((series, key, value))
        if r.get("accuracy") is not None:
            rows.append((series, "accuracy_percent", 100 * r["accuracy"]))
        if r.get("token_rms_vs_converged") is not None:
            rows.append((series, "token_rms_vs_converged", r["token_rms_vs_converged"]))
    return rows


def _generic_figures(record: dict) -> list:
    """A kind this report does not know yet: its top-level numbers, so that no record goes unreported."""
    skip = {"date", "commit", "torch", "device", "device_kind", "benchmark", "dirty"}
    rows = []
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, bool):
            rows.append((record.get("benchmark", "?"), key, float(value)))
        elif isinstance(value, (int, float)):
            rows.append((record.get("benchmark", "?"), key, value))
        elif isinstance(value, dict):
            rows += [(f"{record.get('benchmark', '?')} {key}", k, float(v)) for k, v in value.items()
                     if isinstance(v, (int, float))]
    return rows


def figures_and_spread(record: dict) -> tuple[list[tuple[str, str, float]], dict]:
    """(series, metric, value) rows of one record, and {(series, metric): ratio statistics} for the speed-ups
    measured in turns (benchmarks/common.py:ratio_stats)."""
    kind, rows, spread = record.get("benchmark"), [], {}
    if kind == "bench_train":
        for r in record.get("results", []):
            for variant in ("optimised", "plain"):
                v = r.get(variant, {})
                rows.append((f"train {r['workload']} {variant}", "images_per_s", v.get("images_per_s")))
                if v.get("mfu") is not None:
                    rows.append((f"train {r['workload']} {variant}", "mfu_percent", 100 * v["mfu"]))
            rows.append((f"train {r['workload']}", "speedup", r.get("speedup")))
            spread[f"train {r['workload']}", "speedup"] = _stats(r.get("speedup_stats"))
            rows.append((f"train {r['workload']}", "first_step_loss_rel_diff", r.get("loss_rel_diff")))
    elif kind == "bench_sample":
        rows, spread = _sample_figures(record)
    elif kind == "bench_kernels":
        for r in record.get("results", []):
            series = f"kernel {r['kernel']} {r['mode']} {r['impl']}"
            rows.append((series, "speedup", r.get("speedup_vs_reference")))
            if "speedup_iqr" in r:
                (q1, q3), (lo, hi) = r["speedup_iqr"], r["speedup_range"]
                spread[series, "speedup"] = {"median": r["speedup_vs_reference"], "q1": q1, "q3": q3, "min": lo,
                                             "max": hi, "rounds": record.get("iters")}
    elif kind in ("bench_quality", "photo_tiles"):
        report = record.get("reconstruction") or record.get("report") or {}
        prefix = "tiny" if kind == "bench_quality" else "photo tiles"
        if report:
            rows.append((f"{prefix} flat", "psnr", report["flat"]["psnr"]))
        for r in report.get("per_tokens", []):
            rows.append((f"{prefix} k={r['tokens']}", "psnr", r["psnr"]))
            rows.append((f"{prefix} k={r['tokens']}", "ssim", r["ssim"]))
        if "samples" in record:
            rows.append(("tiny AR samples", "accuracy_percent", 100 * record["samples"]["accuracy"]))
        probe = record.get("shape_probe")
        if probe:  # the shape of originals, reconstructions from all tokens and samples, side by side
            # records with "types" name the 5 types of the distinct-squares generator; older ones 4 groups of another
            series = "tiny shape type" if "types" in probe else "tiny shape probe"
            rows.append((f"{series} originals", "accuracy_percent", 100 * probe["originals"]))
            if probe.get("reconstructions"):
                rows.append((f"{series} reconstructions", "accuracy_percent",
                             100 * probe["reconstructions"][-1]["accuracy"]))
            if "shape_accuracy" in record.get("samples", {}):
                rows.append((f"{series} AR samples", "accuracy_percent", 100 * record["samples"]["shape_accuracy"]))
        fid = record.get("fid")
        if fid and fid.get("reference_weights"):
            rows += [("tiny", "rfid", fid["rfid"])] + ([("tiny", "gfid", fid["gfid"]), ("tiny", "is", fid["is_mean"])]
                                                       if "gfid" in fid else [])
    elif kind == "tokenizer_ablation":
        for name, variant in record.get("variants", {}).items():
            for r in variant["report"]["per_tokens"]:
                rows.append((f"ablation {name} k={r['tokens']}", "psnr", r["psnr"]))
                rows.append((f"ablation {name} k={r['tokens']}", "ssim", r["ssim"]))
    elif kind == "bench_data":
        rows, spread = _data_figures(record)
    elif kind == "bench_scaling":
        rows, spread = _scaling_figures(record)
    elif kind == "sampler_steps":
        rows = _sampler_steps_figures(record)
    elif kind == "shape_probe":
        rows = [("shape probe " + k, "accuracy_percent", 100 * v) for k, v in record.get("accuracy", {}).items()]
    elif kind == "sample_knobs":
        rows = [("sample knobs reconstructions shape", "accuracy_percent",
                 100 * record["reconstructions_shape_accuracy"])]
        for v in record.get("variants", []):
            rows.append((f"sample knobs {v['variant']} shape", "accuracy_percent", 100 * v["shape_accuracy"]))
            rows.append((f"sample knobs {v['variant']} hue", "accuracy_percent", 100 * v["hue_accuracy"]))
    elif kind == "sample_tokens":  # generation from the first k tokens: time and accuracy per k, eager or compiled
        for r in record.get("per_k", []):
            series = f"{record.get('sampler', 'eager')} first {r['tokens']} tokens"
            rows += [(series, "ms_per_image", r["ms_per_image"]),
                     (series, "speedup", r["speedup_over_all_tokens"]["median"]),
                     (series, "hue_percent", 100 * r["hue_accuracy"]),
                     (series, "shape_percent", 100 * r["shape_accuracy"])]
            spread[series, "speedup"] = r["speedup_over_all_tokens"]
    elif kind == "demo_load":
        for level in record.get("levels", []):
            series = f"demo {level['clients']} clients"
            rows += [(series, "requests_per_s", level["requests_per_second"]), (series, "p50_s", level["p50_s"]),
                     (series, "p95_s", level["p95_s"])]
        rows += [("demo handlers", k, v) for k, v in record.get("handlers", {}).items() if isinstance(v, (int, float))]
        rows += [("demo server rss", f"{k}_mib", v) for k, v in record.get("server_rss_mib", {}).items()]
    elif kind == "gpu_suite":
        rows = [(f"gpu suite {s['step']}", "passed", float(s["passed"])) for s in record.get("steps", [])]
    elif kind == "plan_check":
        for r in record.get("results", []):
            for variant in ("optimised", "plain"):
                if f"{variant}_memory_ratio" in r:
                    rows.append((f"plan {r['workload']} vs {variant}", "memory_ratio", r[f"{variant}_memory_ratio"]))
    else:
        rows = _generic_figures(record)
    return [(s, m, float(v)) for s, m, v in rows if v is not None], {k: v for k, v in spread.items() if v}


def figures(record: dict) -> list[tuple[str, str, float]]:
    """(series, metric, value) rows of one record. Metrics include images_per_s, mfu_percent, speedup, psnr, ssim,
    accuracy_percent, rfid, gfid, is, efficiency_percent; every record kind has rows."""
    return figures_and_spread(record)[0]


def format_spread(stats: dict) -> str:
    if not stats:
        return ""
    return (f"IQR x{stats['q1']:.2f}-x{stats['q3']:.2f}, range x{stats['min']:.2f}-x{stats['max']:.2f}, "
            f"{stats.get('rounds')} rounds")


def commit_order(records: list[dict]) -> list[str]:
    seen = {}
    for r in sorted(records, key=lambda r: str(r.get("date"))):
        seen.setdefault(r.get("commit", "unknown"), len(seen))
    return list(seen)


def series_by(records: list[dict], metrics: set, keep=lambda series: True) -> dict:
    """{(device, series, metric): {commit: value of its newest record}}."""
    out = defaultdict(dict)
    for r in sorted(records, key=lambda r: str(r.get("date"))):
        for series, metric, value in figures(r):
            if metric in metrics and keep(series):
                out[(r.get("device", "?"), series, metric)][r.get("commit", "unknown")] = value
    return out


def draw(ax, lines: dict, commits: list[str], title: str, ylabel: str, log: bool = False) -> None:
    index = {c: i for i, c in enumerate(commits)}
    for (device, series, _), values in sorted(lines.items()):
        xs = sorted(values, key=index.get)
        ax.plot([index[c] for c in xs], [values[c] for c in xs], marker="o", label=f"{series} ({device})")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(commits)))
    ax.set_xticklabels(commits, rotation=30, ha="right", fontsize=8)
    if log and lines:
        ax.set_yscale("log")
    if lines:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1, frameon=False)
    else:
        ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot(records: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commits = commit_order(records)
    fig, axes = plt.subplots(1, 3, figsize=(17, 6.5))
    draw(axes[0], series_by(records, {"images_per_s"}, lambda s: s.startswith("train")), commits,
         "training step (optimised vs plain eager)", "images / s", log=True)
    draw(axes[1], series_by(records, {"images_per_s"}, lambda s: s.startswith("sample") and " tokens " not in s),
         commits, "AR sampling (ours, the reference's sampler, compiled; end to end)", "images / s", log=True)
    draw(axes[2], series_by(records, {"mfu_percent"}), commits, "training MFU (bf16 peak)", "MFU %")
    save_figure(fig, out / "throughput.png")

    fig, axes = plt.subplots(1, 3, figsize=(17, 6.5))
    draw(axes[0], series_by(records, {"psnr"}, lambda s: s.startswith("tiny")), commits,
         "tiny tokenizer: held-out PSNR from the first k tokens", "PSNR dB")
    draw(axes[1], series_by(records, {"accuracy_percent"}, lambda s: s.startswith("tiny")), commits,
         "tiny AR: samples in their class (by hue)", "%")
    draw(axes[2], series_by(records, {"rfid", "gfid"}), commits,
         "FID (torch-fidelity Inception weights only)", "FID")
    save_figure(fig, out / "quality.png")
    return [out / "throughput.png", out / "quality.png"]


def _value(v: float) -> str:
    return f"{v:.4g}"


def markdown(records: list[dict]) -> str:
    commits = commit_order(records)
    lines = ["# Benchmark history", "",
             "Written by `python benchmarks/report.py` from `history.jsonl`. Plots: `throughput.png`, `quality.png`.",
             "A record is named `benchmark@date`; \"dirty\" marks one taken while tracked files differed from its "
             "commit (its figures belong to no commit). A speed-up's spread is over the rounds in which the variants "
             "took turns (records from before issue 24 have none: they were not interleaved, or kept only the best "
             "repeat).", "", "## Latest figures", "",
             "Each series' newest value on each device, and the value at the commit before it (if any).", "",
             "| benchmark series | metric | device | commit | value | previous |", "|---|---|---|---|---|---|"]
    latest = series_by(records, {m for r in records for _, m, _ in figures(r)})
    for (device, series, metric), values in sorted(latest.items()):
        ordered = sorted(values, key=commits.index)
        previous = f"{_value(values[ordered[-2]])} ({ordered[-2]})" if len(ordered) > 1 else ""
        lines.append(f"| {series} | {metric} | {device} | {ordered[-1]} | {_value(values[ordered[-1]])} | "
                     f"{previous} |")
    lines += ["", "## Every record, by benchmark, newest first"]
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r.get("benchmark", "?")].append(r)
    for kind in sorted(by_kind):
        lines += ["", f"### {kind}"]
        for r in sorted(by_kind[kind], key=lambda r: str(r.get("date")), reverse=True):
            rows, spread = figures_and_spread(r)
            mark = " (dirty)" if is_dirty(r) else ""
            lines += ["", f"`{record_name(r)}`: commit {r.get('commit')}{mark}, {r.get('device')}, torch "
                          f"{r.get('torch')}", "", "| series | metric | value | spread |", "|---|---|---|---|"]
            lines += [f"| {s} | {m} | {_value(v)} | {format_spread(spread.get((s, m), {}))} |" for s, m, v in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=store.STORE)
    p.add_argument("--out", type=Path, default=store.STORE.parent)
    p.add_argument("--check", action="store_true", help="also check the READMEs' figures against the store")
    args = p.parse_args(argv)
    records = store.read(args.store)
    for path in plot(records, args.out):
        print("wrote", path)
    atomic_write_text(args.out / "REPORT.md", markdown(records))
    print("wrote", args.out / "REPORT.md", f"({len(records)} records)")
    if args.check:
        from benchmarks import figures as quoted
        quoted.main(["--store", str(args.store)])


if __name__ == "__main__":
    main()
