"""Quality against network calls for the samplers, on the tiny trained models, against the many-step reference.

    python benchmarks/sampler_steps.py --tokenizer runs/tokenizer_tiny --ar runs/ar_tiny

- decoder (the tiny tokenizer's flow DiT): reconstruction PSNR of held-out images from 2 and from all 8 tokens
  (the 50-step row is the reference), and PSNR against the converged decode (Euler, 200 calls, the same noise:
  how far a few-step decode is from the ODE's solution), for Euler, Adams-Bashforth 2 and Heun at equal calls.
- head, flow (the tiny AR model): class accuracy of the samples (semanticist_fast.data.procedural.classify),
  against the 50-step SDE the model samples with; for the deterministic samplers also the RMS distance of the
  tokens to the converged ODE solution from the same noise (Euler, 1000 calls).
- head, ddpm (--ar-ddpm: the AR recipe with model.head_objective=ddpm): accuracy against the 250-step ancestral
  sampler, DDIM against DPM-Solver++(2M) at equal calls, the token distance to DPM-Solver++ at 200 calls. The
  tiny recipe's ddpm head does not sample in 15 epochs (its tokens diverge with every sampler, the 250-step
  ancestral one included), so it is off by default; tests/test_samplers.py holds DPM-Solver++ to the closed form.

Its baselines are the many-step samplers named above (what the reference samples with). The seconds each row
records are one pass, not timed in turns with the others: a cost hint, not a comparison.
Appends a record to the results store (benchmarks/results/history.jsonl) and prints the table as Markdown.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_record_arguments, check_clean, describe_device, write_result  # noqa: E402
from semanticist_fast.data.procedural import classify  # noqa: E402
from semanticist_fast.diffusion.flow import flow_steps  # noqa: E402
from semanticist_fast.eval.metrics import psnr  # noqa: E402
from semanticist_fast.eval.reconstruction import held_out_images, reconstruction_report  # noqa: E402
from semanticist_fast.inference import Tokenizer, load_generator  # noqa: E402
from semanticist_fast.inference.generation import generate  # noqa: E402

DECODER = ["euler50", "euler1", "euler2", "adams2", "heun2", "euler4", "adams4", "heun4", "euler8", "adams8", "heun8"]
DECODER_CONVERGED = "euler200"
FLOW_HEAD = [("sde", 50), ("sde", 10), ("ode", 10), ("adams", 10), ("heun", 10), ("sde", 4), ("ode", 4), ("adams", 4),
             ("heun", 4), ("ode", 2), ("adams", 2), ("heun", 2)]
DDPM_HEAD = [("sde", 250), ("sde", 50), ("ode", 25), ("dpm", 25), ("ode", 10), ("dpm", 10), ("ode", 5), ("dpm", 5)]
CONVERGED = {"flow": ("ode", 1000), "ddpm": ("dpm", 200)}
DETERMINISTIC = ("ode", "heun", "adams", "dpm")
NAMES = {("flow", "sde"): "SDE (Euler-Maruyama)", ("flow", "ode"): "ODE Euler", ("flow", "heun"): "ODE Heun",
         ("flow", "adams"): "ODE Adams-Bashforth 2", ("ddpm", "sde"): "ancestral", ("ddpm", "ode"): "DDIM",
         ("ddpm", "dpm"): "DPM-Solver++(2M)"}


def decoder_rows(tokenizer_path: str, num_images: int) -> list[dict]:
    tok = Tokenizer.from_checkpoint(tokenizer_path, device="cpu")
    images = held_out_images(tokenizer_path, tok.image_size, num_images)
    counts = [2, tok.num_slots]
    # The same noise for every spec (reconstruction_report seeds each batch alike): one ODE, solved more or less well.
    _, converged = reconstruction_report(tok, images, counts, steps=DECODER_CONVERGED)
    rows = []
    for spec in DECODER:
        start = time.perf_counter()
        report, rec = reconstruction_report(tok, images, counts, steps=spec)
        seconds = time.perf_counter() - start
        row = {"part": "decoder (flow)", "sampler": spec, "calls": flow_steps(spec)[1], "seconds": seconds}
        for r in report["per_tokens"]:
            row[f"psnr_{r['tokens']}_tokens"] = r["psnr"]
            k = r["tokens"]
            row[f"psnr_vs_converged_{k}_tokens"] = psnr(rec[k], converged[k]).mean().item()
        rows.append(row)
    return rows


def head_rows(ar_path: str, tokenizer_path: str, settings: list, per_class: int) -> list[dict]:
    loaded = load_generator(ar_path, "cpu")
    gpt, s = loaded.gpt, loaded.sample
    tok = Tokenizer.from_checkpoint(tokenizer_path or loaded.tokenizer_path, device="cpu")
    objective = gpt.diffloss.objective
    labels = torch.arange(gpt.num_classes).repeat_interleave(per_class)

    def tokens_for(sampler, steps):
        return generate(gpt, labels, s.guidance, s.guidance_schedule, s.temperature,
                        torch.Generator().manual_seed(0), steps, sampler)

    converged = tokens_for(*CONVERGED[objective])
    rows = []
    for sampler, steps in settings:
        start = time.perf_counter()
        tokens = tokens_for(sampler, steps)
        seconds = time.perf_counter() - start
        images = tok.decode(tokens, num_tokens=gpt.num_tokens, guidance=s.decoder_guidance, steps=s.decoder_steps,
                            generator=torch.Generator().manual_seed(1))
        row = {"part": f"head ({objective})", "sampler": f"{NAMES[objective, sampler]} {steps}", "calls": steps,
               "seconds": seconds, "accuracy": (classify(images, gpt.num_classes) == labels).float().mean().item()}
        if sampler in DETERMINISTIC:
            row["token_rms_vs_converged"] = (tokens - converged).pow(2).mean().sqrt().item()
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = ["part", "sampler", "calls", "psnr_2_tokens", "psnr_8_tokens", "psnr_vs_converged_2_tokens",
               "psnr_vs_converged_8_tokens", "accuracy", "token_rms_vs_converged"]
    heads = ["part", "sampler", "network calls", "PSNR dB, 2 tokens", "PSNR dB, 8 tokens",
             "PSNR dB vs converged, 2", "PSNR dB vs converged, 8", "class accuracy", "token RMS vs converged"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) and c.startswith("token")
                         else f"{v:.1%}" if c == "accuracy" else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="runs/tokenizer_tiny")
    p.add_argument("--ar", default="runs/ar_tiny", help="AR run with a flow head")
    p.add_argument("--ar-ddpm", default="", help="an AR run with a ddpm head (default: none)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--per-class", type=int, default=20)
    add_record_arguments(p)
    args = p.parse_args(argv)
    check_clean(args.allow_dirty, args.no_write)
    rows = decoder_rows(args.tokenizer, args.num_images)
    rows += head_rows(args.ar, args.tokenizer, FLOW_HEAD, args.per_class)
    if args.ar_ddpm:
        rows += head_rows(args.ar_ddpm, args.tokenizer, DDPM_HEAD, args.per_class)
    table = markdown(rows)
    print(table)
    record = {"device": describe_device(torch.device("cpu")), "device_kind": "cpu", "tokenizer": args.tokenizer,
              "ar": args.ar, "ar_ddpm": args.ar_ddpm, "num_images": args.num_images, "per_class": args.per_class,
              "rows": rows, "markdown": table}
    if not args.no_write:
        print("wrote", write_result("sampler_steps", record, allow_dirty=args.allow_dirty))
    return record


if __name__ == "__main__":
    main()
