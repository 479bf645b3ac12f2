"""Plots and a Markdown table of the results store (benchmarks/results/history.jsonl), per commit and device.

    python benchmarks/report.py                  # writes benchmarks/results/{throughput,quality}.png and REPORT.md

- throughput.png: training images/s (bench_train: optimised and plain eager, each workload) and sampling images/s
  (bench_sample: ours and the naive sampler), one line per device; MFU of the training steps where it is known
  (a GPU with a known peak);
- quality.png: the tiny tokenizer's held-out PSNR for each k and the flat baseline, the tiny AR model's samples in
  their class by hue (bench_quality), and rFID / gFID, only from torch-fidelity's Inception weights;
- REPORT.md: the figures of every record, newest first.
Commits are ordered by the date of their first record.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import store  # noqa: E402
from semanticist_fast.common.files import atomic_write, atomic_write_text  # noqa: E402


def figures(record: dict) -> list[tuple[str, str, float]]:
    """(series, metric, value) rows of one record. Metrics: images_per_s, mfu_percent, speedup, psnr, ssim,
    accuracy_percent, rfid, gfid, is."""
    kind, rows = record.get("benchmark"), []
    if kind == "bench_train":
        for r in record.get("results", []):
            for variant in ("optimised", "plain"):
                v = r.get(variant, {})
                rows.append((f"train {r['workload']} {variant}", "images_per_s", v.get("images_per_s")))
                if v.get("mfu") is not None:
                    rows.append((f"train {r['workload']} {variant}", "mfu_percent", 100 * v["mfu"]))
            rows.append((f"train {r['workload']}", "speedup", r.get("speedup")))
    elif kind == "bench_sample":
        for variant in ("ours", "naive"):
            rows.append((f"sample {record.get('model', '')} {variant}", "images_per_s",
                         record.get(variant, {}).get("images_per_s")))
        rows.append((f"sample {record.get('model', '')}", "speedup", record.get("speedup")))
    elif kind == "bench_kernels":
        for r in record.get("results", []):
            rows.append((f"kernel {r['kernel']} {r['mode']} {r['impl']}", "speedup", r.get("speedup_vs_reference")))
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
        fid = record.get("fid")
        if fid and fid.get("reference_weights"):
            rows += [("tiny", "rfid", fid["rfid"])] + ([("tiny", "gfid", fid["gfid"]), ("tiny", "is", fid["is_mean"])]
                                                       if "gfid" in fid else [])
    elif kind == "tokenizer_ablation":
        for name, variant in record.get("variants", {}).items():
            for r in variant["report"]["per_tokens"]:
                rows.append((f"ablation {name} k={r['tokens']}", "psnr", r["psnr"]))
    return [(s, m, float(v)) for s, m, v in rows if v is not None]


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
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)
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
    draw(axes[1], series_by(records, {"images_per_s"}, lambda s: s.startswith("sample")), commits,
         "AR sampling (ours vs naive)", "images / s", log=True)
    draw(axes[2], series_by(records, {"mfu_percent"}), commits, "training MFU (bf16 peak)", "MFU %")
    save_figure(fig, out / "throughput.png")

    fig, axes = plt.subplots(1, 3, figsize=(17, 6.5))
    draw(axes[0], series_by(records, {"psnr"}, lambda s: s.startswith("tiny")), commits,
         "tiny tokenizer: held-out PSNR from the first k tokens", "PSNR dB")
    draw(axes[1], series_by(records, {"accuracy_percent"}), commits,
         "tiny AR: samples in their class (by hue)", "%")
    draw(axes[2], series_by(records, {"rfid", "gfid"}), commits,
         "FID (torch-fidelity Inception weights only)", "FID")
    save_figure(fig, out / "quality.png")
    return [out / "throughput.png", out / "quality.png"]


def markdown(records: list[dict]) -> str:
    commits = commit_order(records)
    lines = ["# Benchmark history", "",
             "Written by `python benchmarks/report.py` from `history.jsonl`. Plots: `throughput.png`, `quality.png`.",
             "", "## Latest figures", "",
             "Each series' newest value on each device, and the value at the commit before it (if any).", "",
             "| benchmark series | metric | device | commit | value | previous |", "|---|---|---|---|---|---|"]
    latest = series_by(records, {"images_per_s", "mfu_percent", "speedup", "psnr", "accuracy_percent", "rfid",
                                 "gfid", "is"})
    for (device, series, metric), values in sorted(latest.items()):
        ordered = sorted(values, key=commits.index)
        previous = f"{values[ordered[-2]]:.4g} ({ordered[-2]})" if len(ordered) > 1 else ""
        lines.append(f"| {series} | {metric} | {device} | {ordered[-1]} | {values[ordered[-1]]:.4g} | {previous} |")
    lines += ["", "## Every record, newest first", "",
              "| date | commit | benchmark | device | series | metric | value |", "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: str(r.get("date")), reverse=True):
        for series, metric, value in figures(r):
            lines.append(f"| {r.get('date')} | {r.get('commit')} | {r.get('benchmark')} | {r.get('device')} | "
                         f"{series} | {metric} | {value:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=store.STORE)
    p.add_argument("--out", type=Path, default=store.STORE.parent)
    args = p.parse_args(argv)
    records = store.read(args.store)
    for path in plot(records, args.out):
        print("wrote", path)
    atomic_write_text(args.out / "REPORT.md", markdown(records))
    print("wrote", args.out / "REPORT.md", f"({len(records)} records)")


if __name__ == "__main__":
    main()
