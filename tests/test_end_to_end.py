"""The main jobs, shortened: a tiny tokenizer whose reconstructions improve with more tokens, then a tiny AR model
whose samples belong to the classes asked for."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from semanticist_fast.config import load_config
from semanticist_fast.data.procedural import ProceduralImages, classify
from semanticist_fast.eval.metrics import mse
from semanticist_fast.models.latent_codec import PixelCodec
from semanticist_fast.models.tokenizer import SemanticistTokenizer
from semanticist_fast.tokenizer import Tokenizer
from semanticist_fast.train_tokenizer import TokenizerRun, train_tokenizer

# The shipped tiny config, with a shorter schedule so the suite stays fast.
SHORT_TOKENIZER = ["train.epochs=4", "train.progress=false", "train.preview_every=0", "train.log_every=64"]


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer_tiny")
    train_tokenizer(load_config(TokenizerRun, "configs/tokenizer_tiny.yaml", SHORT_TOKENIZER), out)
    return out


def test_reconstruction_improves_with_tokens_and_beats_untrained(tiny_tokenizer, tmp_path):
    metrics = tmp_path / "metrics.json"
    cli("reconstruct", str(tiny_tokenizer), "--tokens", "1,4,all", "--num-images", "32",
        "--out", str(tmp_path / "grid.png"), "--metrics-json", str(metrics))
    results = {r["tokens"]: r["mse"] for r in json.loads(metrics.read_text())}
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert results[1] > results[4] > results[8], results

    # The same decoding with the untrained model (same config, same images, same noise).
    run = load_config(TokenizerRun, "configs/tokenizer_tiny.yaml")
    torch.manual_seed(run.train.seed)
    untrained = Tokenizer(SemanticistTokenizer(run.model), PixelCodec(), "cpu")
    val = ProceduralImages(run.model.image_size, 32, split="val", num_classes=run.data.num_classes, seed=run.train.seed)
    images = torch.stack([val[i][0] for i in range(32)])
    rec = untrained.decode(untrained.encode(images), generator=torch.Generator().manual_seed(0))
    assert results[8] < mse(rec, images).mean().item()


def test_ar_samples_belong_to_their_class(tiny_tokenizer, tmp_path):
    out = tmp_path / "ar"
    cli("train", "configs/autoregressive_tiny.yaml", "--out", str(out), f"tokenizer={tiny_tokenizer}",
        "train.epochs=8", "train.progress=false")
    classes = [0, 3, 6]
    cli("sample", str(out), "--classes", ",".join(map(str, classes)), "--per-class", "8", "--cfg", "3.0",
        "--head-steps", "30", "--decoder-steps", "ddim25", "--out", str(tmp_path / "samples.png"))
    saved = np.load(tmp_path / "samples.npz")
    images = torch.from_numpy(saved["images"]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(saved["labels"])
    predicted = classify(images)
    accuracy = (predicted == labels).float().mean().item()
    # Chance is 1/10 (procedural classes are balanced); each class's samples must be mostly its own.
    assert accuracy > 0.6, (accuracy, predicted.tolist())
    for c in classes:
        mine = predicted[labels == c]
        assert (mine == c).float().mean() > max((mine == o).float().mean() for o in range(10) if o != c)
