"""Nothing lost, nothing silent: non-finite runs stop with the step named and the good checkpoints intact, one run per
directory, corrupt checkpoints fall back, caches check their bytes, the AR model keeps its tokenizer, every image
mode decodes to its real values, and the CLI answers bad input in one line with the right exit code."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import MICRO_TOKENIZER, micro_tokenizer_run
from semanticist_fast.common.files import DiskFullError, sha256_file
from semanticist_fast.common.lock import RunLock, RunLockedError
from semanticist_fast.common.runs import CheckpointError, list_checkpoints, read_meta, verify_checkpoint
from semanticist_fast.config import load_config
from semanticist_fast.data import procedural
from semanticist_fast.data.shards import CacheError
from semanticist_fast.data.token_cache import TokenCache
from semanticist_fast.data.transforms import to_rgb
from semanticist_fast.engine.trainer import NonFiniteError
from semanticist_fast.inference import Tokenizer
from semanticist_fast.tasks import train
from semanticist_fast.tasks.autoregressive_stage import ARRun

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "semanticist_fast", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # valid JSON, every line


def finite_checkpoints(out: Path) -> list[str]:
    from semanticist_fast.engine.checkpoint import consolidated_slices
    names = []
    for ckpt in list_checkpoints(out):
        verify_checkpoint(ckpt)
        weights = consolidated_slices(ckpt, "param")
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), ckpt
        names.append(ckpt.name)
    return names


# ---- non-finite runs ----

@pytest.fixture
def nan_images(monkeypatch):
    """Built-in images turn NaN from a given index on (as a corrupt input stream would)."""
    state = {"from_index": None}
    real_getitem = procedural.ProceduralImages.__getitem__

    def getitem(self, index):
        image, label = real_getitem(self, index)
        if state["from_index"] is not None and index >= state["from_index"] and self.split == "train":
            image = torch.full_like(image, float("nan"))
        return image, label

    monkeypatch.setattr(procedural.ProceduralImages, "__getitem__", getitem)
    return state


def test_nan_input_stops_with_the_step_named_and_good_checkpoints_intact(tmp_path, nan_images):
    train(micro_tokenizer_run(*QUIET), tmp_path, stop_at_step=8)
    good = finite_checkpoints(tmp_path)
    assert good == ["ckpt-00000004", "ckpt-00000008"]
    nan_images["from_index"] = 0
    with pytest.raises(NonFiniteError, match=r"at step 9 .*ckpt-00000008") as e:
        train(micro_tokenizer_run(*QUIET, "train.keep_checkpoints=2"), tmp_path, resume=True)
    assert "--resume" in str(e.value)
    assert finite_checkpoints(tmp_path) == good  # nothing written after it, nothing rotated away
    last = records(tmp_path)[-1]
    assert last["step"] == 9 and last["loss"] is None and "loss" in last["nonfinite"]


def test_nan_by_learning_rate_stops_and_writes_no_bad_checkpoint(tmp_path):
    r = cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), *MICRO_TOKENIZER, *QUIET, "optim.lr=1e12",
            "optim.warmup_epochs=0", "train.ckpt_every=1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "non-finite loss or gradient norm at step" in r.stderr and "Traceback" not in r.stderr
    # The checkpoint of step 1 (before the weights overflowed) is intact, finite and verifies; none came after.
    assert finite_checkpoints(tmp_path) == ["ckpt-00000001"]
    assert all(record["step"] < 16 for record in records(tmp_path))


def test_skip_policy_goes_on_and_counts(tmp_path, nan_images):
    nan_images["from_index"] = 0
    metrics = train(micro_tokenizer_run(*QUIET, "train.on_nonfinite=skip"), tmp_path)
    assert metrics["skipped_steps"] == 1  # the last interval's (log_every=1)
    assert sum(r["skipped_steps"] for r in records(tmp_path)) == 16
    finite_checkpoints(tmp_path)  # the skipped steps left the weights as they were


def test_inference_refuses_non_finite_weights(tmp_path):
    from safetensors.torch import load_file

    from semanticist_fast.common.runs import write_weights_file
    from semanticist_fast.config import to_dict

    run = micro_tokenizer_run(*QUIET)
    train(run, tmp_path, stop_at_step=4)
    weights = load_file(str(list_checkpoints(tmp_path)[-1] / "ema.safetensors"))
    weights["dit.null_cond"][0, 0, 0] = float("nan")
    write_weights_file(tmp_path / "nan.safetensors", weights, "tokenizer", to_dict(run))
    with pytest.raises(CheckpointError, match="non-finite weights in 1 tensors .*dit.null_cond"):
        Tokenizer.from_checkpoint(tmp_path / "nan.safetensors")
    r = cli("reconstruct", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "grid.png"))
    assert r.returncode == 1 and "non-finite" in r.stderr and not (tmp_path / "grid.png").exists()


# ---- one run per directory ----

def test_a_second_run_on_one_directory_is_refused(tmp_path):
    with RunLock(tmp_path):  # a run in progress (here: this test)
        r = cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), *MICRO_TOKENIZER, *QUIET)
        assert r.returncode == 1
        assert "in use by another training run" in r.stderr and f"pid {os.getpid()}" in r.stderr
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
    train(micro_tokenizer_run(*QUIET), tmp_path, stop_at_step=2)  # the holder is gone: the lock is free


def test_nothing_is_written_before_the_inputs_check_out(tmp_path):
    out = tmp_path / "run"
    r = cli("train", "configs/tokenizer_tiny.yaml", "--out", str(out), *MICRO_TOKENIZER, "data.dataset=folder",
            f"data.root={tmp_path / 'no_such_folder'}")
    assert r.returncode == 1 and "no_such_folder" in r.stderr
    assert not out.exists()


# ---- corrupt checkpoints ----

def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: Path):
    path.write_bytes(b"")


def _garbage(path: Path):
    path.write_bytes(os.urandom(path.stat().st_size))  # same size: only the checksum can tell


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """A run stopped at step 8 (checkpoints 4 and 8), and the same run uninterrupted."""
    base = tmp_path_factory.mktemp("healthy")
    train(micro_tokenizer_run(*QUIET), base / "full")
    train(micro_tokenizer_run(*QUIET), base / "stopped", stop_at_step=8)
    return base


@pytest.mark.parametrize("damage", [_truncate, _zero, _garbage], ids=["truncated", "zero-byte", "garbage"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(damage, healthy_run, tmp_path, caplog):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(healthy_run / "stopped", out)
    newest = list_checkpoints(out)[-1]
    damage(newest / "state" / "rank-00000.pt")
    with pytest.raises(CheckpointError, match="rank-00000.pt"):
        verify_checkpoint(newest)
    (out / "checkpoints" / ".tmp-ckpt-00000099").mkdir()  # an orphan of a kill mid-write
    train(micro_tokenizer_run(*QUIET), out, resume=True)
    assert "skipping checkpoint" in caplog.text and "rank-00000.pt" in caplog.text
    assert (out / "checkpoints" / "unreadable-ckpt-00000008").is_dir()  # set aside, not deleted
    assert not (out / "checkpoints" / ".tmp-ckpt-00000099").exists()
    # Resumed from step 4: the rest of the run is the uninterrupted one's.
    full = {r["step"]: r["loss"] for r in records(healthy_run / "full")}
    assert {r["step"]: r["loss"] for r in records(out)} == full


def test_readers_fall_back_too_and_fail_clearly_when_nothing_verifies(healthy_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(healthy_run / "stopped", out)
    first, newest = list_checkpoints(out)
    _truncate(newest / "ema.safetensors")
    tok = Tokenizer.from_checkpoint(out)  # what `reconstruct RUN` and `sample RUN` do
    assert tok.num_slots == 4
    r = cli("reconstruct", str(out), "--num-images", "2", "--tokens", "1,all")
    assert r.returncode == 0 and "skipping checkpoint" in r.stderr and "ckpt-00000008" in r.stderr
    _zero(first / "meta.json")
    r = cli("reconstruct", str(out), "--num-images", "2")
    assert r.returncode == 1 and "no checkpoint under" in r.stderr and "meta.json" in r.stderr
    r = cli("train", "configs/tokenizer_tiny.yaml", "--out", str(out), "--resume", *MICRO_TOKENIZER, *QUIET)
    assert r.returncode == 1 and "no checkpoint in" in r.stderr and "verifies" in r.stderr


def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(healthy_run, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(healthy_run / "stopped", out)
    before = {p: sha256_file(p) for p in out.glob("checkpoints/**/*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("semanticist_fast.engine.checkpoint.torch.save", full_disk)
    with pytest.raises(DiskFullError, match=r"disk full writing .*ckpt-00000012.*MiB free.*intact"):
        train(micro_tokenizer_run(*QUIET), out, resume=True)
    assert {p: sha256_file(p) for p in out.glob("checkpoints/**/*") if p.is_file()} == before
    assert [p.name for p in (out / "checkpoints").iterdir()] and not list((out / "checkpoints").glob(".tmp-*"))


# ---- caches ----

@pytest.fixture
def token_cache(tmp_path):
    from test_token_cache import build, save_tokenizer
    ckpt = save_tokenizer(tmp_path / "tok.safetensors")
    tok = Tokenizer.from_checkpoint(ckpt, device="cpu")
    data = procedural.ProceduralImages(16, 20, split="train", num_classes=5)
    return build(tok, ckpt, data, tmp_path / "cache")


def test_a_garbage_shard_is_refused_and_named(token_cache):
    shard = token_cache / "tokens-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-64:] = os.urandom(64)  # the header stays intact
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="tokens-00001.npy does not match its sha256"):
        TokenCache(token_cache)


def test_zero_byte_shard_and_junk_manifest_are_named(token_cache):
    (token_cache / "labels-00002.npy").write_bytes(b"")
    with pytest.raises(CacheError, match="labels-00002.npy has 0 bytes"):
        TokenCache(token_cache)
    (token_cache / "manifest.json").write_text("not json {")
    with pytest.raises(CacheError, match="manifest.json is not readable JSON"):
        TokenCache(token_cache)


def test_values_are_checked_as_they_are_read(token_cache):
    from semanticist_fast.data.shards import ShardWriter
    manifest = json.loads((token_cache / "manifest.json").read_text())
    writer = ShardWriter(token_cache, manifest, ())
    tokens = np.load(token_cache / "tokens-00001.npy")
    tokens[3, 1, 0, 0] = np.nan  # as a broken encoder would have written it: a valid record, a NaN value
    writer.write(1, tokens=tokens, labels=np.load(token_cache / "labels-00001.npy"))
    cache = TokenCache(token_cache)
    with pytest.raises(CacheError, match=r"non-finite tokens in shard 1 .*row 3, view 1"):
        cache.read(8 + 3, 1)
    labels = np.load(token_cache / "labels-00000.npy")
    labels[2] = 7
    writer.write(0, tokens=np.load(token_cache / "tokens-00000.npy"), labels=labels)
    with pytest.raises(CacheError, match=r"labels outside 0..4 \(first: 7 in shard 0, row 2\)"):
        TokenCache(token_cache, num_classes=5)


# ---- the AR run keeps its tokenizer ----

MICRO_AR = ["model.layers=1", "model.heads=2", "model.dim=32", "model.head_width=32", "model.head_depth=1",
            "model.num_tokens=4", "model.diffusion_batch_mul=1", "model.head_sample_steps=2", "data.num_items=32",
            "cache.shard_size=32", "cache.views=center", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
            "train.ckpt_every=4", "train.preview_every=0", "sample.head_steps=2", "sample.decoder_steps=euler1",
            *QUIET]


def test_sample_decodes_with_the_tokenizer_the_ar_model_was_trained_on(tmp_path):
    tok_run, ar_run = tmp_path / "tok", tmp_path / "ar"
    train(micro_tokenizer_run(*QUIET), tok_run, stop_at_step=8)
    train(load_config(ARRun, "configs/autoregressive_tiny.yaml", MICRO_AR + [f"tokenizer={tok_run}"]), ar_run)
    pinned = ar_run / "tokenizer.safetensors"
    assert sha256_file(pinned) == sha256_file(list_checkpoints(tok_run)[-1] / "ema.safetensors")
    assert read_meta(list_checkpoints(ar_run)[-1])["config"]["tokenizer_sha256"] == sha256_file(pinned)
    args = ["sample", str(ar_run), "--classes", "1,2", "--per-class", "2"]
    first = cli(*args, "--out", str(tmp_path / "a.png"))
    assert first.returncode == 0, first.stderr
    train(micro_tokenizer_run(*QUIET), tok_run, resume=True)  # the tokenizer trains on: its newest checkpoint changes
    again = cli(*args, "--out", str(tmp_path / "b.png"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    pinned.unlink()  # without the run's copy, the config's tokenizer is the trained-on one no more
    refused = cli(*args, "--out", str(tmp_path / "c.png"))
    assert refused.returncode == 1 and "--tokenizer" in refused.stderr and "sha256" in refused.stderr
    explicit = cli(*args, "--tokenizer", str(tok_run), "--out", str(tmp_path / "c.png"))
    assert explicit.returncode == 0, explicit.stderr


# ---- images ----

def test_every_image_mode_decodes_to_its_real_values(tmp_path):
    grey16 = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257: mid-grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")
        assert np.asarray(to_rgb(im)).mean() == pytest.approx(128, abs=0.5)
    floats = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), "F")
    assert np.asarray(to_rgb(floats)).mean() == pytest.approx(64, abs=0.5)
    ints = Image.fromarray(np.full((4, 4), 200, dtype=np.int32), "I")  # 8-bit values held in 32 bits
    assert np.asarray(to_rgb(ints)).mean() == pytest.approx(200, abs=0.5)
    half = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 128, np.uint8)]), "LA")
    assert np.asarray(to_rgb(half)).mean() == pytest.approx(127, abs=1.5)  # black at half opacity over white
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(palette))[0, 0]) == (255, 255, 255)  # the transparent colour shows the background
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)


def test_a_16_bit_png_trains_and_reconstructs_from_its_real_values(tmp_path):
    from semanticist_fast.data.datasets import load_images
    from semanticist_fast.data.folder import ImageFolderDataset

    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(tmp_path / "a" / "x.png")
    image, _ = ImageFolderDataset(tmp_path)[0]
    assert image.mean().item() == pytest.approx(0.502, abs=0.003)  # not 0.998: PIL's convert would clip it
    assert load_images([str(tmp_path / "a" / "x.png")], 16).mean().item() == pytest.approx(0.502, abs=0.003)


# ---- the CLI ----

def test_version_names_the_package_torch_cuda_and_the_extension():
    r = cli("--version")
    assert r.returncode == 0
    assert "semanticist-fast" in r.stdout and f"torch {torch.__version__}" in r.stdout
    assert "CUDA:" in r.stdout and "extension:" in r.stdout


@pytest.mark.parametrize("args, says", [
    (["train", "configs/tokenizer_tiny.yaml", "optim.lr=-1"], "optim.lr must be > 0"),
    (["train", "configs/tokenizer_tiny.yaml", "train.batch_size=0"], "train.batch_size must be > 0"),
    (["reconstruct", "runs/none", "--num-images", "0"], "--num-images must be at least 1"),
    (["reconstruct", "runs/none", "--batch-size", "-3"], "--batch-size must be at least 1"),
    (["sample", "runs/none", "--per-class", "0"], "--per-class must be at least 1"),
])
def test_usage_errors_exit_2_in_one_line(args, says, tmp_path):
    r = cli(*args, "--out" if args[0] == "train" else "--device", str(tmp_path / "x") if args[0] == "train" else "cpu")
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr


def test_runtime_errors_exit_1_in_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    r = cli("convert", str(junk), str(tmp_path / "out.safetensors"))
    assert r.returncode == 1 and "cannot read weights from" in r.stderr and "junk.pt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = cli("reconstruct", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = cli("--debug", "convert", str(junk), str(tmp_path / "out.safetensors"))
    assert "Traceback" in r.stderr  # --debug shows where


def test_every_option_has_help_with_its_default():
    import argparse

    from semanticist_fast.cli import build_parser

    def check(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    check(sub, f"{name} {sub_name}".strip())
                continue
            if action.dest == "help" or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if name and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            assert "(default:" in parser.format_help(), name

    check(build_parser(), "")


def test_a_non_tty_log_of_128_steps_is_short(tmp_path):
    r = cli("train", "configs/tokenizer_tiny.yaml", "--out", str(tmp_path), *MICRO_TOKENIZER, "train.epochs=16",
            "train.ckpt_every=1000", "train.progress=true")
    assert r.returncode == 0, r.stderr[-2000:]
    progress = [line for line in r.stderr.splitlines() if "step " in line and "/128" in line]
    assert 5 <= len(progress) <= 12, progress  # a line per tenth of the run, not one per step
    assert len("\n".join(progress)) < 2048 and "\r" not in r.stderr
    assert len(records(tmp_path)) == 128  # every step still goes to metrics.jsonl
