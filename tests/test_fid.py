"""FID, IS and SSIM against independent computations, and `eval recon` / `eval gen` end to end on micro models:
the ADM .npz they write, resuming a killed run, and two ranks (torchrun, gloo) giving the samples of one.

The Inception network is torch-fidelity's own class with random weights saved to a local file, so the real code
path runs; its FIDs and IS mean nothing beyond these comparisons.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from helpers import micro_tokenizer_run
from semanticist_fast.config import load_config
from semanticist_fast.data.procedural import ProceduralImages
from semanticist_fast.eval.grid import from_nhwc, to_uint8
from semanticist_fast.eval.inception import (fid_statistics, frechet_distance, inception_features, inception_score,
                                             load_inception, save_random_inception)
from semanticist_fast.eval.metrics import psnr, ssim
from semanticist_fast.eval.fid_stats import load_reference
from semanticist_fast.tasks import train
from semanticist_fast.tasks.autoregressive_stage import ARRun

pytestmark = pytest.mark.usefixtures("one_thread")

# Same thread count in every process: CPU matmuls may round differently with a different number of threads.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception-random.pth", seed=0)


@pytest.fixture(scope="module")
def net(inception_file):
    return load_inception(inception_file)


def procedural(n: int, size: int = 32) -> torch.Tensor:
    data = ProceduralImages(size, n, split="val")
    return torch.stack([data[i][0] for i in range(n)])


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    return images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def scipy_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID written out from the features as the TTUR / ADM evaluators do: means, covariances, scipy's sqrtm."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular covariances (fewer samples than dimensions): still accurate here
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.fixture(scope="module")
def features(inception_file):
    """768-d features (an earlier Inception layer torch-fidelity offers): the same computation as the 2048-d pool,
    at a fraction of the CPU time of a 2048 x 2048 eigendecomposition."""
    net = load_inception(inception_file, fid_layer="768", logits=False)
    clean = procedural(16)
    return {sigma: inception_features(net, to_uint8(noisy(clean, sigma) if sigma else clean))["pool"]
            for sigma in (0.0, 0.05, 0.1, 0.2)}


def test_fid_of_a_set_with_itself_is_zero(net, tmp_path):
    pool = inception_features(net, to_uint8(procedural(12)))["pool"]
    assert pool.shape == (12, 2048)
    stats = fid_statistics(pool)
    scale = np.trace(stats["sigma"])
    assert scale > 1e-2  # the random network's features are not degenerate
    assert abs(frechet_distance(stats, stats)) < 1e-5 * scale
    # An ADM-style reference file (mu / sigma) reads back the same statistics.
    np.savez(tmp_path / "ref.npz", mu=stats["mu"], sigma=stats["sigma"])
    loaded = load_reference(tmp_path / "ref.npz", net)
    assert np.array_equal(loaded["mu"], stats["mu"]) and np.array_equal(loaded["sigma"], stats["sigma"])


@pytest.fixture(scope="module")
def noisy_fids(features):
    reference = fid_statistics(features[0.0])
    return {s: frechet_distance(fid_statistics(features[s]), reference) for s in (0.05, 0.1, 0.2)}


def test_fid_grows_with_added_noise(noisy_fids):
    fids = [noisy_fids[s] for s in (0.05, 0.1, 0.2)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_fid_equals_a_direct_scipy_computation(features, noisy_fids):
    for sigma in (0.05, 0.2):
        direct = scipy_frechet_distance(features[sigma], features[0.0])
        assert noisy_fids[sigma] == pytest.approx(direct, rel=1e-6)


def test_reference_from_images_equals_the_features_statistics(net, tmp_path):
    images = to_uint8(procedural(6))
    np.savez(tmp_path / "batch.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    expected = fid_statistics(inception_features(net, images)["pool"])
    loaded = load_reference(tmp_path / "batch.npz", net)
    assert np.allclose(loaded["mu"], expected["mu"]) and np.allclose(loaded["sigma"], expected["sigma"])
    with pytest.raises(ValueError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", x=np.zeros(3))
        load_reference(tmp_path / "bad.npz", net)


def test_inception_score_of_a_constant_prediction_is_one(net):
    # The same image 10 times: the network predicts the same distribution for each, so IS = exp(0) = 1.
    logits = inception_features(net, to_uint8(procedural(1).expand(10, -1, -1, -1)))["logits"]
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # Confident predictions spread evenly over K classes: IS = K.
    peaked = np.full((40, 1008), -50.0, dtype=np.float32)
    peaked[np.arange(40), np.arange(40) % 5] = 50.0
    assert inception_score(peaked, splits=1)[0] == pytest.approx(5.0, rel=1e-6)


def test_ssim_equals_scikit_image_on_known_photographs():
    import skimage.data as skimage_data  # a test dependency (requirements-dev.txt): its absence fails, not skips
    from skimage.metrics import structural_similarity

    photos = [skimage_data.astronaut()[100:196, 180:260], skimage_data.coffee()[150:230, 200:300]]
    for photo in photos:
        clean = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 255
        blurred = torch.nn.functional.avg_pool2d(clean, 3, stride=1, padding=1, count_include_pad=False)
        for other in (blurred, noisy(clean, 0.1).clamp(0, 1), clean.flip(-1)):
            expected = structural_similarity(clean[0].permute(1, 2, 0).double().numpy(),
                                             other[0].permute(1, 2, 0).double().numpy(), channel_axis=-1,
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=1.0)
            assert ssim(clean, other).item() == pytest.approx(expected, abs=1e-6)


def test_missing_inception_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "absent.pth")
    (tmp_path / "wrong.pth").write_bytes(b"")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not an InceptionV3 state dict"):
        load_inception(tmp_path / "wrong.pth")


# ---- the commands, on micro models ----

def cli(*args, env=ENV, check=True):
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", *args], capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def micro_runs(tmp_path_factory):
    """A micro tokenizer and a micro AR model over its tokens, each trained for a few steps."""
    root = tmp_path_factory.mktemp("micro")
    train(micro_tokenizer_run(), root / "tokenizer")
    ar = load_config(ARRun, "configs/autoregressive_tiny.yaml", [
        f"tokenizer={root / 'tokenizer'}", "model.layers=1", "model.heads=2", "model.dim=32", "model.head_width=32",
        "model.head_depth=1", "model.num_tokens=4", "model.head_sample_steps=4", "data.num_items=40",
        "cache.views=center", "cache.shard_size=64", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
        "train.ckpt_every=100", "train.progress=false", "sample.head_steps=4"])
    train(ar, root / "ar")
    return root / "tokenizer", root / "ar"


def read_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_eval_recon_end_to_end(micro_runs, inception_file, tmp_path):
    tokenizer, _ = micro_runs
    out = tmp_path / "recon"
    # Settings from three places: a YAML's eval section, a key=value override, flags.
    (tmp_path / "eval.yaml").write_text("eval: {shard_size: 3, tokens: '1,2'}\n")
    args = ["eval", "recon", str(tokenizer), "--inception-path", str(inception_file), "--config",
            str(tmp_path / "eval.yaml"), "eval.fid_features=64", "--out", str(out), "--no-progress"]
    result = cli(*args, "--tokens", "1,all")
    summary = json.loads((out / "summary.json").read_text())
    assert [row["tokens"] for row in summary["per_tokens"]] == [1, 4] and summary["images"] == 8
    assert summary["fid_features"] == "64"
    assert "rFID" in result.stdout and f"{summary['per_tokens'][1]['psnr']:.2f}" in result.stdout
    # The figures are those of the written files: the ADM archives against the held-out images.
    run = micro_tokenizer_run()
    val = ProceduralImages(16, 8, split="val", num_classes=run.data.num_classes, seed=run.train.seed)
    originals = to_uint8(torch.stack([val[i][0] for i in range(8)]))
    net64 = load_inception(inception_file, fid_layer="64", logits=False)
    for row in summary["per_tokens"]:
        saved = read_npz(out / f"reconstructions-k{row['tokens']}.npz")
        assert saved["arr_0"].dtype == np.uint8 and saved["arr_0"].shape == (8, 16, 16, 3)
        assert saved["arr_1"].tolist() == [val.label(i) for i in range(8)]
        rec = from_nhwc(saved["arr_0"])
        assert row["psnr"] == pytest.approx(psnr(rec, originals.float() / 255).mean().item(), rel=1e-5)
        assert row["ssim"] == pytest.approx(ssim(rec, originals.float() / 255).mean().item(), rel=1e-5)
        fid = frechet_distance(fid_statistics(inception_features(net64, to_uint8(rec))["pool"]),
                               fid_statistics(inception_features(net64, originals)["pool"]))
        assert row["rfid"] == pytest.approx(fid, rel=1e-4, abs=1e-6)
    assert (out / "reconstructions.png").stat().st_size > 0
    # A second run finds every shard done and recomputes the same figures.
    cli(*args, "--tokens", "1,all")
    assert json.loads((out / "summary.json").read_text())["per_tokens"] == summary["per_tokens"]
    # Other settings in the same directory are refused, naming what differs (the YAML's tokens: 1, 2).
    refused = cli(*args, check=False)
    # A store made with other settings: a runtime error (exit 1), naming the field.
    assert refused.returncode == 1 and "tokens" in refused.stderr and "[1, 2]" in refused.stderr


def test_reconstruct_and_eval_recon_report_the_same_figures(micro_runs, inception_file, tmp_path):
    """The two commands on the same held-out images with the same seed, in the same chunks (--batch-size = shard
    size): one pipeline, so the same PSNR and SSIM for every k and for the flat baseline."""
    tokenizer, _ = micro_runs
    same = ["--tokens", "1,2,all", "--num-images", "7", "--seed", "5"]  # 7 images in chunks of 3: a short last one
    cli("eval", "recon", str(tokenizer), "--inception-path", str(inception_file), "--out", str(tmp_path / "eval"),
        "--shard-size", "3", "eval.fid_features=64", "--no-progress", *same)
    cli("reconstruct", str(tokenizer), "--batch-size", "3", "--metrics-json", str(tmp_path / "report.json"), *same)
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    reconstructed = json.loads((tmp_path / "report.json").read_text())
    assert evaluated["images"] == reconstructed["images"] == 7
    for name in ("psnr", "ssim"):
        assert evaluated["flat"][name] == reconstructed["flat"][name]
    pairs = list(zip(evaluated["per_tokens"], reconstructed["per_tokens"], strict=True))
    assert [e["tokens"] for e, _ in pairs] == [1, 2, 4]
    for e, r in pairs:
        assert (e["tokens"], e["psnr"], e["ssim"], e["psnr_over_flat"]) == \
            (r["tokens"], r["psnr"], r["ssim"], r["psnr_over_flat"])
    assert pairs[0][0]["psnr"] != pairs[-1][0]["psnr"]  # the rows differ: the figures are not all one value
    # Another seed draws other decoder noise, and both commands see it.
    cli("reconstruct", str(tokenizer), "--batch-size", "3", "--metrics-json", str(tmp_path / "seed6.json"),
        *same[:-1], "6")
    other = json.loads((tmp_path / "seed6.json").read_text())
    assert other["per_tokens"][0]["psnr"] != reconstructed["per_tokens"][0]["psnr"]


GEN_ARGS = ["--per-class", "2", "--shard-size", "4", "--reference-images", "12", "eval.fid_features=64",
            "--no-progress"]


def gen(ar, inception_file, out, *extra, **kwargs):
    return cli("eval", "gen", str(ar), "--inception-path", str(inception_file), "--out", str(out), *GEN_ARGS,
               *extra, **kwargs)


@pytest.fixture(scope="module")
def gen_whole(micro_runs, inception_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "whole"
    gen(micro_runs[1], inception_file, out)
    return out


def test_eval_gen_end_to_end(gen_whole):
    summary = json.loads((gen_whole / "summary.json").read_text())
    assert summary["samples"] == 20 and summary["classes"] == 10
    assert np.isfinite(summary["gfid"]) and summary["gfid"] > 0 and summary["is_mean"] >= 1.0
    assert "12 training images" in summary["reference"]
    saved = read_npz(gen_whole / "samples.npz")
    assert saved["arr_0"].dtype == np.uint8 and saved["arr_0"].shape == (20, 16, 16, 3)
    assert saved["arr_1"].tolist() == [i % 10 for i in range(20)]  # class-balanced
    assert len(list(gen_whole.parent.glob("reference-*.npz"))) == 1  # the cached reference statistics
    assert (gen_whole / "samples.png").stat().st_size > 0


def test_eval_gen_from_the_first_k_tokens(micro_runs, inception_file, gen_whole, tmp_path):
    """`eval gen --tokens 2` scores samples drawn from the first 2 of the 4 tokens: those sample_images draws with
    the same seeds and tokens=2."""
    from semanticist_fast.common.seeds import derive_seed
    from semanticist_fast.eval.gen_eval import _SAMPLE_STREAM
    from semanticist_fast.inference import Tokenizer, load_generator, sample_images
    from semanticist_fast.inference.generation import with_overrides

    out = tmp_path / "k2"
    result = gen(micro_runs[1], inception_file, out, "--tokens", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample"]["tokens"] == 2 and "the first 2 tokens" in result.stdout
    images = read_npz(out / "samples.npz")["arr_0"]
    assert np.abs(images.astype(int) - read_npz(gen_whole / "samples.npz")["arr_0"].astype(int)).max() > 8
    loaded = load_generator(micro_runs[1], "cpu")
    tok = Tokenizer.from_checkpoint(loaded.tokenizer_file(), device="cpu")
    labels = torch.arange(4) % 10  # shard 0: the first shard_size samples
    generator = torch.Generator().manual_seed(derive_seed(0, _SAMPLE_STREAM, 0))
    expected = to_uint8(sample_images(loaded.gpt, tok, labels, with_overrides(loaded.sample, tokens=2), generator))
    assert np.array_equal(images[:4], expected.permute(0, 2, 3, 1).numpy())


def test_missing_inception_file_fails_before_sampling(micro_runs, tmp_path):
    r = cli("eval", "gen", str(micro_runs[1]), "--inception-path", str(tmp_path / "none.pth"), "--out",
            str(tmp_path / "g"), check=False)
    assert r.returncode == 1 and "weights-inception-2015-12-05-6726825d.pth" in r.stderr  # a missing file: exit 1
    assert not (tmp_path / "g").exists()


def test_killed_run_resumes_to_identical_samples(micro_runs, inception_file, gen_whole, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "semanticist_fast", "eval", "gen", str(micro_runs[1]), "--inception-path",
           str(inception_file), "--out", str(out), *GEN_ARGS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shards" / "logits-00000.npy").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "shards").glob("logits-*.npy"))
    assert 1 <= len(done) < 5, done  # killed part-way
    assert not (out / "samples.npz").exists()
    gen(micro_runs[1], inception_file, out)
    whole, resumed = read_npz(gen_whole / "samples.npz"), read_npz(out / "samples.npz")
    assert np.array_equal(whole["arr_0"], resumed["arr_0"]) and np.array_equal(whole["arr_1"], resumed["arr_1"])
    assert json.loads((out / "summary.json").read_text())["gfid"] == json.loads(
        (gen_whole / "summary.json").read_text())["gfid"]


def test_ranks_come_from_the_launcher_environment(monkeypatch):
    from semanticist_fast.common.distributed import Ranks, ranks_from_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ranks_from_env() == Ranks(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = ranks_from_env()
    assert ranks == Ranks(1, 2, 1) and [s for s in range(5) if ranks.owns(s)] == [1, 3]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        ranks_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        ranks_from_env()


def test_two_ranks_give_the_samples_of_one(micro_runs, inception_file, gen_whole, tmp_path):
    out = tmp_path / "ranks"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--module", "semanticist_fast", "eval", "gen", str(micro_runs[1]), "--inception-path",
                        str(inception_file), "--out", str(out), *GEN_ARGS],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2
    whole, split = read_npz(gen_whole / "samples.npz"), read_npz(out / "samples.npz")
    assert np.array_equal(whole["arr_0"], split["arr_0"]) and np.array_equal(whole["arr_1"], split["arr_1"])
    assert summary["gfid"] == json.loads((gen_whole / "summary.json").read_text())["gfid"]
    assert summary["is_mean"] == json.loads((gen_whole / "summary.json").read_text())["is_mean"]
