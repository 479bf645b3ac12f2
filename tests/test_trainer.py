"""The training loop: exact resume, crash safety, clear errors, and a loss that goes down."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import MICRO_TOKENIZER, micro_tokenizer_run
from semanticist_fast.common.runs import list_checkpoints, read_meta, write_weights_file
from semanticist_fast.engine.checkpoint import consolidated_slices
from semanticist_fast.tasks import train as train_tokenizer


def read_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def newest(out: Path) -> Path:
    return list_checkpoints(out)[-1]


def test_resume_continues_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train_tokenizer(micro_tokenizer_run(), full)
    train_tokenizer(micro_tokenizer_run(), split, stop_at_step=6)
    assert max(read_losses(split)) == 6
    # A fresh process-like start: new model, new optimizer, everything restored from the step-6 checkpoint.
    train_tokenizer(micro_tokenizer_run(), split, resume=True)
    a, b = read_losses(full), read_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert a == b  # the next batches and the next losses are those of the uninterrupted run, bit for bit
    for key in ("param", "ema", "exp_avg", "exp_avg_sq"):
        final_a, final_b = consolidated_slices(newest(full), key), consolidated_slices(newest(split), key)
        assert final_a.keys() == final_b.keys()
        for name in final_a:
            torch.testing.assert_close(final_a[name], final_b[name], rtol=0, atol=0, msg=f"{key} {name}")


def test_checkpoint_contents_and_pruning(tmp_path):
    train_tokenizer(micro_tokenizer_run("train.keep_checkpoints=2"), tmp_path)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["ckpt-00000012", "ckpt-00000016"]
    meta = read_meta(ckpts[-1])
    assert {"config", "kind", "engine", "world_size", "files"} <= set(meta)
    assert meta["step"] == 16 and meta["epoch"] == 2 and meta["step_in_epoch"] == 0
    assert sorted(meta["files"]) == ["ema.safetensors", "state/rank-00000.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000012", "ckpt-00000016"]


def test_loss_goes_down_when_overfitting(tmp_path):
    run = micro_tokenizer_run("data.num_items=8", "train.epochs=150", "train.log_every=10", "train.ckpt_every=1000",
                              "optim.lr=2e-3", "optim.warmup_epochs=5", "model.nested.enabled=false",
                              "model.nested.full_drop_prob=0.0")
    train_tokenizer(run, tmp_path)
    losses = read_losses(tmp_path)
    first, last = losses[10], losses[max(losses)]
    assert last < 0.5 * first, (first, last)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "semanticist_fast", *args], capture_output=True, text=True, **kw)


def test_killed_run_resumes_to_the_same_result(tmp_path):
    overrides = MICRO_TOKENIZER + ["train.epochs=6", "train.ckpt_every=2"]
    ref = tmp_path / "ref"
    assert _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(ref), *overrides).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml",
                             "--out", str(out), *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(out), "the run was killed before its first checkpoint"
    assert list_checkpoints(out)[-1].name < list_checkpoints(ref)[-1].name, "the run finished before the kill"
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(out), "--resume", *overrides)
    assert r.returncode == 0, r.stderr
    assert read_losses(out) == read_losses(ref)


def test_config_typo_is_a_clear_error(tmp_path):
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), "train.batch_sise=8")
    assert r.returncode == 2
    assert "train.batch_sise" in r.stderr and "batch_size" in r.stderr
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), "model.codec.kind=vae")
    assert r.returncode == 2 and "'pixel'" in r.stderr and "'kl16'" in r.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing written for a config that does not load


def test_resume_with_another_config_is_refused_and_loses_nothing(tmp_path):
    train_tokenizer(micro_tokenizer_run(), tmp_path, stop_at_step=4)
    before = {p: p.read_bytes() for p in sorted(tmp_path.glob("checkpoints/**/*")) if p.is_file()}
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), "--resume", *MICRO_TOKENIZER,
             "model.decoder.hidden=64")
    assert r.returncode == 2
    assert "model.decoder.hidden" in r.stderr
    assert {p: p.read_bytes() for p in sorted(tmp_path.glob("checkpoints/**/*")) if p.is_file()} == before
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), *MICRO_TOKENIZER)
    assert r.returncode == 2 and "--resume" in r.stderr


def test_checkpoint_from_another_config_does_not_load(tmp_path):
    from semanticist_fast.config import to_dict
    from semanticist_fast.inference import Tokenizer

    from safetensors.torch import load_file

    train_tokenizer(micro_tokenizer_run(), tmp_path, stop_at_step=4)
    weights = load_file(str(newest(tmp_path) / "ema.safetensors"))
    other = micro_tokenizer_run("model.decoder.hidden=64")
    # The file claims a config its weights were not trained with.
    write_weights_file(tmp_path / "bad.safetensors", weights, "tokenizer", to_dict(other))
    with pytest.raises(ValueError, match="does not fit this model"):
        Tokenizer.from_checkpoint(tmp_path / "bad.safetensors", device="cpu")


def test_published_ddpm_decoder_trains_and_decodes(tmp_path):
    """The tiny config trains a flow decoder; the published DDPM decoder (learned variance, VLB) keeps its path."""
    from semanticist_fast.inference import Tokenizer

    ddpm = ("model.diffusion.objective=ddpm", "model.decoder.learn_sigma=true", "model.diffusion.sample_steps=ddim5",
            "model.decoder.linear_slot_path=false", "model.encoder.input_range=unit", "model.encoder.pos_embed_std=0.02")
    train_tokenizer(micro_tokenizer_run(*ddpm), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("vb" in r and r["loss"] > r["mse"] for r in records)  # the hybrid loss: MSE + the VLB term
    tok = Tokenizer.from_checkpoint(tmp_path, device="cpu")
    assert tok.model.dit.out_channels == 6 and tok.model.dit.slot_to_patches is None
    images = torch.rand(2, 3, 16, 16)
    out = tok.decode(tok.encode(images), num_tokens=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
