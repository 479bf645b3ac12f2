"""Data-parallel scaling: measured throughput on 1 and 2 ranks side by side, and a model of ZeRO-2/3 communication.

    python benchmarks/bench_scaling.py                     # both parts (about 2 minutes on 2 CPU cores)
    python benchmarks/bench_scaling.py --skip-measure      # the model only

Measured: the same training run (the tiny tokenizer, micro shapes, one global batch) on 1 rank (the single engine,
all cores) and on 2 ranks (ZeRO-2 on gloo, the cores split between them), steady-state images/s from each run's
metrics.jsonl, and their ratio. The baseline is the one-rank run (what a user with one device runs); the runs take
turns (--rounds of each, benchmarks/common.py:interleaved) and the ratio is the median over the rounds, with its
spread. On a 2-core CPU this shows the engine's overhead, not a speed-up.

Modelled, per optimizer step and per GPU, for tokenizer-L and AR-L at the published global batch (2048) on 8, 64 and
256 GPUs: bytes each rank moves (fp32 gradients and weights, ring collectives: (N-1)/N of the volume each way),
the compute time at a stated MFU, how much of the traffic the backward (ZeRO-2: the gradient reduce-scatter) and the
forward + backward (ZeRO-3: the weight all-gathers, with prefetch) can hide, and the efficiency that leaves:
compute / (compute + exposed communication). The links: NVLink inside a node of 8 (450 GB/s per GPU each way, H100/
H200 NVLink 4), 8 x 400 Gb/s InfiniBand between nodes (50 GB/s per GPU each way). The model ignores latency and
congestion, so it is an upper bound on efficiency.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semanticist_fast.plan import flops  # noqa: E402
from benchmarks.common import (add_record_arguments, check_clean, describe_device, format_ratio,  # noqa: E402
                               interleaved, ratio_stats, write_result)
from semanticist_fast.plan.comm import zero_comm  # noqa: E402
from semanticist_fast.models.gpt import GPT, GPTConfig  # noqa: E402
from semanticist_fast.models.tokenizer import SemanticistTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 2048
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 dense bf16
NVLINK_GBPS, IB_GBPS = 450.0, 50.0  # per GPU, each way
GPUS_PER_NODE = 8
MICRO = ["model.image_size=16", "model.encoder.size=custom", "model.encoder.dim=64", "model.encoder.depth=2",
         "model.encoder.heads=2", "model.encoder.patch_size=8", "model.encoder.num_slots=4",
         "model.decoder.size=custom", "model.decoder.depth=2", "model.decoder.hidden=64", "model.decoder.heads=2",
         "model.decoder.patch_size=4", "data.num_items=1024", "train.batch_size=32", "train.epochs=1",
         "train.log_every=4", "train.ckpt_every=100000", "train.preview_every=0", "train.progress=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(ranks: int, cores: int) -> dict:
    """Steady-state images/s of the micro run on `ranks` ranks sharing `cores` cores."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml", "--out", str(out), *MICRO]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
        if ranks == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                   str(_port()), *args, "train.engine=deepspeed", "train.zero_stage=2"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the {ranks}-rank run failed:\n{r.stderr[-3000:]}")
        rates = [json.loads(line)["images_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rates[2:] or rates  # the first intervals include start-up
    return {"ranks": ranks, "threads_per_rank": max(1, cores // ranks), "images_per_s": median(steady),
            "intervals": len(rates)}


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_zero(name: str, params: int, flops_per_image: float, gpus: int, mfu: float, micro_batch: int) -> dict:
    """One step of global batch GLOBAL_BATCH on `gpus` GPUs in micro-steps of up to `micro_batch` images (the
    published configs' train.micro_batch_size): semanticist_fast/plan/comm.py's ZeRO model."""
    bandwidth = (NVLINK_GBPS if gpus <= GPUS_PER_NODE else IB_GBPS) * 1e9  # a ring runs at its slowest link
    return {"workload": name, "gpus": gpus, "params": params,
            **zero_comm(params, flops_per_image, GLOBAL_BATCH, gpus, micro_batch, PEAK_BF16_TFLOPS * 1e12, mfu,
                        bandwidth)}


def comm_model(mfu: float) -> list[dict]:
    tok_cfg = flops.published_tokenizer_config()
    gpt_cfg = GPTConfig(size="L", num_tokens=32)
    with torch.device("meta"):
        tok_params = trainable_params(SemanticistTokenizer(tok_cfg))
        gpt_params = trainable_params(GPT(gpt_cfg))
    tok_flops = flops.tokenizer_step(tok_cfg, repa=True)["total"]
    gpt_flops = flops.ar_step(gpt_cfg)["total"]
    return [model_zero(name, params, f, gpus, mfu, micro)
            for name, params, f, micro in (("tokenizer-L", tok_params, tok_flops, 64), ("ar-L", gpt_params, gpt_flops, 256))
            for gpus in (8, 64, 256)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-measure", action="store_true", help="the communication model only")
    p.add_argument("--mfu", type=float, default=0.4, help="the compute efficiency the model assumes")
    p.add_argument("--rounds", type=int, default=2, help="runs of each, taking turns (1 rank, 2 ranks, 2, 1, ...)")
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    record = {"device": describe_device(torch.device("cpu")), "device_kind": "cpu", "global_batch": GLOBAL_BATCH,
              "assumed_mfu": args.mfu, "peak_bf16_tflops": PEAK_BF16_TFLOPS,
              "links_GBps": {"nvlink": NVLINK_GBPS, "infiniband": IB_GBPS}}
    if not args.skip_measure:
        cores = os.cpu_count() or 1
        runs = {"one_rank": [], "two_ranks": []}
        interleaved({"one_rank": lambda: runs["one_rank"].append(measure(1, cores)),
                     "two_ranks": lambda: runs["two_ranks"].append(measure(2, cores))},
                    torch.device("cpu"), rounds=args.rounds, warmup=0)
        # Per round, seconds per image of each (the steady-state rates, start-up excluded), so the ratio of a round
        # is two ranks' images/s over one rank's.
        stats = ratio_stats([1 / r["images_per_s"] for r in runs["one_rank"]],
                            [1 / r["images_per_s"] for r in runs["two_ranks"]])
        record["measured"] = {
            "baseline": "one rank, the single engine, all cores", "rounds": args.rounds,
            **{name: {"images_per_s": median(r["images_per_s"] for r in rs), "runs": rs} for name, rs in runs.items()},
            "ratio_2_over_1": stats["median"], "ratio_2_over_1_stats": stats}
        m = record["measured"]
        print(f"measured (micro tokenizer, batch 32, {cores} cores): 1 rank {m['one_rank']['images_per_s']:.0f} "
              f"img/s, 2 ranks {m['two_ranks']['images_per_s']:.0f} img/s, 2 over 1 {format_ratio(stats)}")
    record["model"] = comm_model(args.mfu)
    print(f"{'workload':>12} {'GPUs':>5} {'img/GPU':>8} {'micro':>5} {'compute ms':>10} {'Z2 GB':>7} {'Z2 eff':>7} "
          f"{'Z3 GB':>7} {'Z3 eff':>7}")
    for row in record["model"]:
        print(f"{row['workload']:>12} {row['gpus']:>5} {row['images_per_gpu']:>8.0f} {row['micro_steps']:>5.0f} "
              f"{row['compute_s'] * 1e3:>10.1f} "
              f"{row['zero2']['bytes_per_gpu'] / 1e9:>7.2f} {row['zero2']['efficiency']:>7.1%} "
              f"{row['zero3']['bytes_per_gpu'] / 1e9:>7.2f} {row['zero3']['efficiency']:>7.1%}")
    if not args.no_write:
        print("wrote", write_result("bench_scaling", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
