"""The browser demos (`semanticist-fast demo`): the handlers against independent computations, then the page itself
served on localhost and driven through the system's headless Chromium (Selenium + /usr/bin/chromedriver).

The models are a micro tokenizer (16 px, 4 slots) trained here for 512 steps (about 20 s), enough for its later
tokens to add detail on held-out images, and a micro AR model over its tokens (a few steps: the generation tab only
has to answer). The browser uploads the held-out image on which the tokenizer's 4-token PSNR beats its 1-token PSNR
by the widest margin (test_later_tokens_add_detail checks that margin), so the ordering the page must show is not
a coin toss.

With SEMANTICIST_DEMO_SCREENSHOTS=DIR (and SEMANTICIST_DEMO_TOKENIZER / SEMANTICIST_DEMO_AR naming trained runs)
the browser test serves those runs instead, asks for every token count, and saves a screenshot of each tab into
DIR (docs/demo_tokenizer.png, docs/demo_generation.png: README, "Browser demo").
"""
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import micro_tokenizer_run
from semanticist_fast.config import load_config
from semanticist_fast.data.datasets import load_images
from semanticist_fast.data.procedural import class_name
from semanticist_fast.eval.metrics import psnr, ssim
from semanticist_fast.eval.reconstruction import as_scored, chunk_generator
from semanticist_fast.export.package import export_sampler
from semanticist_fast.inference import Tokenizer, load_generator, sample_images
from semanticist_fast.inference.generation import with_overrides
from semanticist_fast.tasks import train
from semanticist_fast.tasks.autoregressive_stage import ARRun

gradio = pytest.importorskip("gradio", reason="the demo needs the [demo] extra: pip install -e .[demo]")
from semanticist_fast.demo import handlers  # noqa: E402
from semanticist_fast.demo.handlers import DemoInputError  # noqa: E402

# Gradio's queue calls pandas APIs that pandas 3 deprecates: its business, not ours.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]

# The recipe of test_tokenizer_learns at 16 px (decoder patch 4: four times fewer tokens, so faster), trained on
# 4,096 images twice over in batches of 16.
MICRO_RECIPE = ("model.encoder.dim=64", "model.encoder.depth=2", "model.encoder.heads=4", "model.encoder.patch_size=4",
                "model.decoder.depth=2", "model.decoder.hidden=64", "model.decoder.heads=4",
                "model.decoder.patch_size=4", "model.nested.enable_nest_after=30", "data.num_items=4096",
                "train.batch_size=16", "train.epochs=2", "train.ema_decay=0.95", "optim.warmup_epochs=0.05",
                "train.log_every=64", "train.ckpt_every=100000")
SCREENSHOTS = os.environ.get("SEMANTICIST_DEMO_SCREENSHOTS")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
CAPTION = re.compile(r"(\d+) tokens? · PSNR (-?[\d.]+) dB · SSIM (-?[\d.]+)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tokenizer run, AR run): trained here, or the ones the screenshot mode names."""
    if SCREENSHOTS:
        return Path(os.environ["SEMANTICIST_DEMO_TOKENIZER"]), Path(os.environ["SEMANTICIST_DEMO_AR"])
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo_runs")
    train(micro_tokenizer_run(*MICRO_RECIPE), root / "tokenizer")
    ar = load_config(ARRun, "configs/autoregressive_tiny.yaml", [
        f"tokenizer={root / 'tokenizer'}", "model.layers=1", "model.heads=2", "model.dim=32", "model.head_width=32",
        "model.head_depth=1", "model.num_tokens=4", "model.head_sample_steps=4", "data.num_items=40",
        "cache.views=center", "cache.shard_size=64", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
        "train.ckpt_every=100", "train.progress=false", "sample.head_steps=4"])
    train(ar, root / "ar")
    return root / "tokenizer", root / "ar"


@pytest.fixture(scope="module")
def models(runs, tmp_path_factory):
    tokenizer, ar = runs
    return handlers.load_models(tokenizer, ar, device="cpu", out_dir=tmp_path_factory.mktemp("demo_out"))


def save_png(image: torch.Tensor, path: Path, scale: int = 4) -> Path:
    """(3, S, S) in [0, 1] -> a PNG `scale` times larger (the demo centre-crops it back down to S)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)
    return path


def margins(models) -> list[float]:
    """Per held-out image: PSNR from all tokens minus PSNR from the first one."""
    out = []
    for i in range(len(models.held_out)):
        result = handlers.reconstruct_gallery(models, i, [1, "all"])
        out.append(result.psnr[1] - result.psnr[0])
    return out


@pytest.fixture(scope="module")
def upload(models, tmp_path_factory) -> Path:
    """The held-out image on which later tokens add the most, as a PNG file (what the browser uploads)."""
    best = int(np.argmax(margins(models)))
    return save_png(models.held_out[best], tmp_path_factory.mktemp("upload") / f"held-out-{best}.png")


# -- the handlers -------------------------------------------------------------------------------------------------

def test_later_tokens_add_detail(models):
    assert len(models.held_out) == 8 and models.held_out.shape[1:] == (3, 16, 16)
    m = margins(models)
    assert np.mean(m) > 0, m  # on average over the held-out images, not only on the one the browser uploads
    assert max(m) >= 0.5, m


def test_gallery_scores_are_those_of_eval_metrics(models, upload):
    result = handlers.reconstruct_gallery(models, str(upload), ["all", 2, "1", 2], seed=5)
    assert result.counts == [1, 2, 4]  # sorted, without repeats, "all" is K
    x = as_scored(load_images([str(upload)], 16))  # the image as an 8-bit file holds it
    tok = models.tokenizer
    tokens = tok.encode(x)
    for k, p, s, caption, shown in zip(result.counts, result.psnr, result.ssim, result.captions, result.images):
        # The pipeline of `reconstruct` and `eval recon`: one image is chunk 0 of the request's seed, the same noise
        # for every k, scored on the 8-bit images.
        rec = tok.decode(tokens, num_tokens=k, generator=chunk_generator("cpu", 5, 0))
        assert p == pytest.approx(psnr(as_scored(rec), x).item(), abs=1e-4)
        assert s == pytest.approx(ssim(as_scored(rec), x).item(), abs=1e-5)
        assert caption == f"{k} token{'s' * (k > 1)} · PSNR {p:.2f} dB · SSIM {s:.3f}"
        # Shown enlarged 10x (nearest neighbour), the pixels those of the reconstruction rounded to 8 bits.
        assert shown.size == (160, 160)
        small = np.asarray(shown)[::10, ::10]
        assert np.array_equal(small, (rec[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    flat = x.mean((2, 3), keepdim=True).expand_as(x)
    assert result.flat_psnr == pytest.approx(psnr(as_scored(flat), x).item(), abs=1e-4)
    assert result.plot.size[0] > 200 and result.plot.size[1] > 100
    # Another seed draws other noise; the single-k image is the gallery's for that k.
    image, caption = handlers.first_k_image(models, str(upload), 2, seed=5)
    assert caption == result.captions[1] and np.array_equal(np.asarray(image), np.asarray(result.images[1]))
    assert handlers.reconstruct_gallery(models, str(upload), [2], seed=6).psnr[0] != result.psnr[1]


def test_built_in_images_and_their_names(models):
    # The procedural classes are named by hue and shape; captions name the held-out image's class.
    assert class_name(0) == "red discs" and class_name(6) == "azure squares"  # hue 216 degrees, shape 6 % 5
    assert models.held_out_captions[0].startswith("held-out #0: ")
    assert handlers.class_choices(models)[:2] == ["0: red discs", "1: orange squares"]
    result = handlers.reconstruct_gallery(models, 3, [1])
    x = as_scored(models.held_out[3:4])  # scored as an 8-bit file holds it, decoded from chunk 0 of seed 0
    rec = models.tokenizer.decode(models.tokenizer.encode(x), num_tokens=1, generator=chunk_generator("cpu", 0, 0))
    assert result.psnr[0] == pytest.approx(psnr(as_scored(rec), x).item(), abs=1e-4)


def test_bad_input_gets_a_message(models, tmp_path, monkeypatch):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are not the pixels you are looking for" * 10)
    with pytest.raises(DemoInputError, match=r"cannot read image notes\.png.*upload a PNG"):
        handlers.reconstruct_gallery(models, str(not_an_image), [1])
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)  # 48 megapixels of one grey: a small file, refused by its header
    with pytest.raises(DemoInputError, match=r"huge\.png is 8000x6000 \(48\.0 megapixels\); at most 40"):
        handlers.reconstruct_gallery(models, str(huge), [1])
    monkeypatch.setattr(models, "limits", replace(models.limits, upload_mib=0.001))
    with pytest.raises(DemoInputError, match=r"the demo takes files up to 0\.001 MiB"):
        handlers.input_image(models, str(huge))
    monkeypatch.undo()
    with pytest.raises(DemoInputError, match="no image"):
        handlers.reconstruct_gallery(models, None, [1])
    with pytest.raises(DemoInputError, match="built-in image 8 does not exist"):
        handlers.reconstruct_gallery(models, 8, [1])
    with pytest.raises(DemoInputError, match=r"5 is outside 1\.\.4"):
        handlers.reconstruct_gallery(models, 0, [1, 5])
    with pytest.raises(DemoInputError, match=r"0 is outside 1\.\.4"):
        handlers.first_k_image(models, 0, 0)
    with pytest.raises(DemoInputError, match="'many' is not a number"):
        handlers.reconstruct_gallery(models, 0, ["many"])
    with pytest.raises(DemoInputError, match="at least one token count"):
        handlers.reconstruct_gallery(models, 0, [])
    with pytest.raises(DemoInputError, match="euler0|steps"):
        handlers.reconstruct_gallery(models, 0, [1], steps="euler0")
    with pytest.raises(DemoInputError, match=r"decoder guidance must be in 0\.\.20 \(1 is none\), got -1"):
        handlers.reconstruct_gallery(models, 0, [1], guidance=-1)


def test_generation_grid_and_download(models, runs):
    result = handlers.generate_grid(models, ["2: yellow diamonds", 0], per_class=3, temperature=0.8, seed=7)
    assert result.labels == [2, 2, 2, 0, 0, 0]  # a row per class, in the order chosen
    assert result.captions[0] == "2: yellow diamonds" and len(result.images) == 6
    # The images are those inference.sample_images draws with the same seed and settings.
    loaded = load_generator(runs[1], "cpu")
    decoder = Tokenizer.from_checkpoint(loaded.tokenizer_file(), device="cpu")
    expected = sample_images(loaded.gpt, decoder, torch.tensor(result.labels),
                             with_overrides(loaded.sample, temperature=0.8), torch.Generator().manual_seed(7))
    with np.load(result.archive) as saved:
        assert saved["images"].dtype == np.uint8 and saved["images"].shape == (6, 16, 16, 3)
        assert saved["labels"].tolist() == result.labels
        assert np.array_equal(saved["images"], (expected.clamp(0, 1) * 255).round().to(torch.uint8)
                              .permute(0, 2, 3, 1).numpy())
    grid = Image.open(result.grid)
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns, 2 rows of 16 px with 2 px padding
    with pytest.raises(DemoInputError, match=r"class 10 is outside 0\.\.9"):
        handlers.generate_grid(models, [10])
    with pytest.raises(DemoInputError, match="unknown class 'purple unicorns'"):
        handlers.generate_grid(models, ["purple unicorns"])
    with pytest.raises(DemoInputError, match="choose at least one class"):
        handlers.generate_grid(models, [])
    with pytest.raises(DemoInputError, match=r"samples per class must be in 1\.\.16"):
        handlers.generate_grid(models, [0], per_class=0)
    with pytest.raises(DemoInputError, match="at most 64 at once"):
        handlers.generate_grid(models, list(range(5)), per_class=16)
    with pytest.raises(DemoInputError, match="temperature must be above 0"):
        handlers.generate_grid(models, [0], temperature=0)
    with pytest.raises(DemoInputError, match="guidance schedule 'cosine'"):
        handlers.generate_grid(models, [0], guidance_schedule="cosine")
    for k in (0, 5):
        with pytest.raises(DemoInputError, match=rf"token count must be in 1\.\.4 \(this AR model draws 4\), got {k}"):
            handlers.generate_grid(models, [0], tokens=k)


def test_generation_from_the_first_k_tokens(models, runs):
    """The tab's k: the images `sample --tokens k` draws (k AR steps, the rest of the slots nulled)."""
    result = handlers.generate_grid(models, [1, 4], per_class=2, seed=3, tokens=2)
    loaded = load_generator(runs[1], "cpu")
    decoder = Tokenizer.from_checkpoint(loaded.tokenizer_file(), device="cpu")
    expected = sample_images(loaded.gpt, decoder, torch.tensor(result.labels), with_overrides(loaded.sample, tokens=2),
                             torch.Generator().manual_seed(3))
    full = handlers.generate_grid(models, [1, 4], per_class=2, seed=3)
    with np.load(result.archive) as saved, np.load(full.archive) as all_tokens:
        assert np.array_equal(saved["images"], (expected.clamp(0, 1) * 255).round().to(torch.uint8)
                              .permute(0, 2, 3, 1).numpy())
        assert not np.array_equal(saved["images"], all_tokens["images"])


def test_the_limits_bound_each_request(models, monkeypatch):
    """Beyond a bound, one line naming it; at the bound, an answer. The tiny tokenizer decodes with a flow process."""
    assert models.tokenizer.config.diffusion.objective == "flow"
    limits = models.limits
    assert limits == handlers.DemoLimits()  # the defaults the README states
    too_many = f"euler{limits.flow_steps + 1}"
    with pytest.raises(DemoInputError, match=rf"{too_many} make {limits.flow_steps + 1} network calls; the demo "
                                             rf"allows at most {limits.flow_steps} a decode"):
        handlers.reconstruct_gallery(models, 0, [1], steps=too_many)
    with pytest.raises(DemoInputError, match=f"make {limits.flow_steps + 2} network calls"):
        handlers.reconstruct_gallery(models, 0, [1], steps=f"heun{limits.flow_steps + 2}")
    with pytest.raises(DemoInputError, match=r"decoder steps euler10000000000\.\.\.: give a sampler"):
        handlers.reconstruct_gallery(models, 0, [1], steps="euler" + "1" + "0" * 4000)
    at_bound = handlers.reconstruct_gallery(models, 0, [1], steps=f"euler{limits.flow_steps}")
    assert at_bound.counts == [1]
    for guidance in (20.5, float("nan"), "lots"):
        with pytest.raises(DemoInputError, match="decoder guidance must"):
            handlers.reconstruct_gallery(models, 0, [1], guidance=guidance)
        with pytest.raises(DemoInputError, match="class guidance must"):
            handlers.generate_grid(models, [0], 1, guidance=guidance)
    with pytest.raises(DemoInputError, match=r"temperature must be above 0 and at most 2, got 2\.5"):
        handlers.generate_grid(models, [0], 1, temperature=2.5)
    with pytest.raises(DemoInputError, match=r"the seed must be in 0\.\.2\^63-1, got -1"):
        handlers.reconstruct_gallery(models, 0, [1], seed=-1)
    with pytest.raises(DemoInputError, match="the seed must be a number"):
        handlers.generate_grid(models, [0], 1, seed=float("inf"))
    # A trusted user's limits: what they allow runs, what they forbid is refused with their numbers.
    monkeypatch.setattr(models, "limits", replace(limits, flow_steps=3, per_class=2, samples=3))
    with pytest.raises(DemoInputError, match="at most 3 a decode"):
        handlers.reconstruct_gallery(models, 0, [1], steps="euler4")
    with pytest.raises(DemoInputError, match=r"samples per class must be in 1\.\.2, got 3"):
        handlers.generate_grid(models, [0], 3)
    with pytest.raises(DemoInputError, match="2 classes x 2 is 4 images; the demo draws at most 3 at once"):
        handlers.generate_grid(models, [0, 1], 2)
    assert handlers.reconstruct_gallery(models, 0, [1], steps="euler3").counts == [1]
    # The README names every limit (the keys of `demo --limit KEY=VALUE`) with its default.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = " ".join(readme.split("### Browser demo", 1)[1].split("\n### ", 1)[0].split())
    for key, value in asdict(handlers.DemoLimits()).items():
        assert f"`{key}` {value:g}" in section or f"`{key}` {value:,}" in section, (key, value)


def test_deadline_and_a_gone_client_stop_the_model_work(models, monkeypatch):
    """A request runs until its deadline or until its client is gone, then stops between two network calls: the
    model's slot is free again at once, and the next request is answered."""
    calls = []

    def never_gone() -> bool:  # asked once per network call: counts them
        calls.append(1)
        return False

    monkeypatch.setattr(models, "limits", replace(models.limits, flow_steps=10**9, request_seconds=0.5))
    with pytest.raises(handlers.RequestStopped, match=r"stopped: it ran past 0\.5 s of model time"):
        handlers.reconstruct_gallery(models, 0, [1], steps="euler1000000", cancelled=never_gone)
    assert 0 < len(calls) < 1_000_000  # stopped on the way, not at the end

    def gone_after(n: int):
        asked = []
        return lambda: asked.append(1) or len(asked) > n

    with pytest.raises(handlers.RequestStopped, match="stopped: its client has gone"):
        handlers.reconstruct_gallery(models, 0, [1, 2], steps="euler1000", cancelled=gone_after(5))
    # Generation: the AR model's head steps stop alike (4 head steps per token, 4 tokens, then the decoder).
    gen_calls = []
    with pytest.raises(handlers.RequestStopped, match="its client has gone"):
        handlers.generate_grid(models, [0], 1, cancelled=lambda: gen_calls.append(1) or len(gen_calls) > 6)
    assert len(gen_calls) == 7  # the seventh network call was refused
    result = handlers.generate_grid(models, [0], 1, cancelled=lambda: False)
    assert len(result.images) == 1


def test_downloads_stay_bounded(models, monkeypatch):
    """A long-running server keeps only the newest KEEP_DOWNLOADS requests' files; the newest is always there."""
    monkeypatch.setattr(handlers, "KEEP_DOWNLOADS", 2)
    results = [handlers.generate_grid(models, [0], per_class=1, seed=s) for s in range(4)]
    kept = sorted(p.name for p in models.out_dir.glob("samples-*"))
    assert len(kept) == 2
    assert results[-1].grid.is_file() and results[-1].archive.is_file()
    assert not results[0].grid.exists()


def test_generation_with_an_export(models, runs, tmp_path):
    # Uncompiled (torch.export programs: no C++ compiler, seconds); the runtime runs them as it runs AOTInductor's.
    export_sampler(runs[1], tmp_path / "exported", max_batch=4, device="cpu", compile=False, progress=False)
    exported = handlers.load_models(runs[0], runs[1], compiled=tmp_path / "exported", device="cpu",
                                    out_dir=tmp_path / "out")
    assert exported.generation.source.endswith("(compiled)") and exported.generation.batch_size == 4
    # One batch of 4 each way: the same noise, so the same images (up to the last 8-bit step).
    a = handlers.generate_grid(exported, [1, 3], per_class=2, seed=11)
    b = handlers.generate_grid(models, [1, 3], per_class=2, seed=11)
    with np.load(a.archive) as x, np.load(b.archive) as y:
        assert x["labels"].tolist() == y["labels"].tolist() == [1, 1, 3, 3]
        assert np.abs(x["images"].astype(int) - y["images"].astype(int)).max() <= 1
    # ... and from the first k tokens alike.
    a = handlers.generate_grid(exported, [1, 3], per_class=2, seed=11, tokens=1)
    b = handlers.generate_grid(models, [1, 3], per_class=2, seed=11, tokens=1)
    with np.load(a.archive) as x, np.load(b.archive) as y:
        assert np.abs(x["images"].astype(int) - y["images"].astype(int)).max() <= 1
    # More images than the export's largest batch are drawn in batches of it.
    assert handlers.generate_grid(exported, [0, 2, 4], per_class=2, seed=0).labels == [0, 0, 2, 2, 4, 4]


def test_tokenizer_only_demo_has_no_generation(runs):
    tokenizer_only = handlers.load_models(runs[0], device="cpu")
    assert tokenizer_only.generation is None and handlers.class_choices(tokenizer_only) == []
    with pytest.raises(DemoInputError, match="start the demo with --ar RUN"):
        handlers.generate_grid(tokenizer_only, [0])


# -- the command and the page, in a real browser ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "semanticist_fast", "demo", *args]


def test_the_command_serves_the_page_on_localhost(runs):
    usage = subprocess.run(demo_command(), capture_output=True, text=True, env=ENV)
    assert usage.returncode == 2 and "give --tokenizer RUN, --ar RUN" in usage.stderr
    port = free_port()
    server = subprocess.Popen(demo_command("--ar", str(runs[1]), "--port", str(port)), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 90, None
        while page is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, f"no page on port {port} (server exit code {server.poll()})"
        # The page's configuration is inline: the header names the tokenizer the AR run was trained on.
        assert "semanticist-fast demo" in page and "4 ordered tokens per 16 px image" in page
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: Gradio closes the server and the command returns
        output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output[-3000:]
    assert f"serving the demo on http://127.0.0.1:{port}" in output and "Traceback" not in output


# The load test's server: the micro models answer a well-formed request in well under a second, so a 2 s deadline
# only cuts off the abusive euler100000 (the flow bound raised to let it start: the deadline, not the bound, stops it).
LOAD_LIMITS = {"flow_steps": 100_000, "request_seconds": 2.0, "queue": 8, "sessions": 8}
WELL_FORMED_CLIENTS, REQUESTS_EACH = 6, 4
RSS_GROWTH_MIB = 32  # the server's growth over two more rounds of the whole mix, once warm (measured: 0 to 8 MiB)


def test_under_load(runs, tmp_path):
    """The `demo` command on loopback under concurrent gradio_client clients: well-formed tokenizer and generation
    requests, requests beyond every bound, and a client that drops its connection mid-request, all at once; then a
    burst past the queue's bound. Every well-formed request is answered (each within the time the limits promise:
    the deadline of every request that can be ahead of it), every abusive one refused or stopped with its one line,
    the burst's overflow told the demo is busy, and the server stays up with its memory flat. Speed: bench_demo.py.
    """
    from gradio_client.utils import QueueError

    from benchmarks import bench_demo as bench

    image = save_png(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), tmp_path / "image.png")
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}/"
    server = bench.serve(runs[0], runs[1], port, [f"{k}={v}" for k, v in LOAD_LIMITS.items()], log)
    # The most a well-formed request can wait: every request that can be ahead of it (the queue's bound, and the
    # one running) using its whole deadline; plus slack for a loaded 2-core machine.
    promised = (LOAD_LIMITS["queue"] + 1) * LOAD_LIMITS["request_seconds"] + 30

    def mix():
        with ThreadPoolExecutor(3) as pool:
            load = pool.submit(bench.load_round, url, image, WELL_FORMED_CLIENTS, REQUESTS_EACH, classes)
            abuse = pool.submit(bench.abusive_requests, url, image, huge, classes)
            gone = pool.submit(bench.disconnect_mid_request, url, image, "euler100000")
            return load.result(timeout=300), abuse.result(timeout=300), gone.result(timeout=300)

    try:
        bench.wait_up(url, server)
        classes = bench.class_choices(url)
        mix()
        bench.load_round(url, image, WELL_FORMED_CLIENTS, REQUESTS_EACH, classes)  # warm: memory at its working size
        warm = bench.rss_mib(server.pid)
        rounds = [mix(), mix()]
        grown = bench.rss_mib(server.pid) - warm

        # A burst past the queue's bound while one request holds the model: the overflow is told to try again.
        burst = bench.connect(url, image)
        hold = burst.submit(["1"], 1.0, "euler100000", 0, api_name="/on_reconstruct")
        time.sleep(0.5)  # hold is running: what follows waits or is refused
        waiting = [burst.submit(["1"], 1.0, "euler2", i, api_name="/on_reconstruct")
                   for i in range(LOAD_LIMITS["queue"] + 8)]
        outcomes = []
        for job in [hold, *waiting]:
            try:
                outcomes.append(job.result(timeout=promised))
            except QueueError as e:
                outcomes.append(f"busy: {e}")
            except Exception as e:  # the page's one line
                outcomes.append(f"error: {e}")
        burst.close()
        after = bench.load_round(url, image, 1, 2, classes)  # still up, still answering
    finally:
        code = bench.stop(server)
    output = log.read_text()
    assert code == 0, output[-3000:]

    for load, abuse, last in rounds:
        assert len(load["answers"]) == WELL_FORMED_CLIENTS * REQUESTS_EACH
        for answer in load["answers"]:
            assert re.search(r"Decoded 2 reconstructions in [\d.]+ s|4 images in [\d.]+ s", answer), answer
        assert max(load["latencies"]) < promised, sorted(load["latencies"])[-3:]
        bounds = LOAD_LIMITS["flow_steps"]
        assert abuse == {
            "decoder steps euler100000": "stopped: it ran past 2 s of model time, the most one request may take "
                                         "here: ask for fewer steps, token counts or samples",
            "decoder steps euler99999999": f"decoder steps euler99999999 make 99999999 network calls; the demo allows "
                                           f"at most {bounds} a decode",
            "decoder guidance 1e6": "decoder guidance must be in 0..20 (1 is none), got 1e+06",
            "class guidance -3": "Value -3.0 is less than minimum value 0.",  # Gradio's own check comes first
            "17 samples per class": "Value 17 is greater than maximum value 16.",
            "80 samples": "5 classes x 16 is 80 images; the demo draws at most 64 at once",
            "temperature 50": "Value 50.0 is greater than maximum value 2.0.",
            "a 48-megapixel image": "image huge.png is 8000x6000 (48.0 megapixels); at most 40 megapixels are taken: "
                                    "downscale it"}, abuse
        assert '"msg":"progress"' in last  # it dropped the connection while its request ran
    assert output.count("request stopped: its client has gone") == 3  # each disconnect stopped the model work
    assert output.count("request stopped: it ran past 2 s") == 3 + 1  # the abusive euler100000s and the burst's hold
    assert grown < RSS_GROWTH_MIB, (warm, grown)

    assert outcomes[0].startswith("error: stopped: it ran past 2 s")
    busy = [o for o in outcomes if isinstance(o, str) and o.startswith("busy")]
    served = [o for o in outcomes[1:] if o not in busy]
    assert busy and all("Queue is full! Please try again." in o for o in busy), outcomes
    assert served and all(isinstance(o, tuple) for o in served), outcomes  # the rest were answered
    assert len(after["answers"]) == 2


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: scripts/install.sh --dev installs Debian's chromium "
                    "and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium: pip install -r requirements-dev.txt")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def server(models):
    from semanticist_fast.demo.app import launch

    port = free_port()
    app = launch(models, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def wait_for(driver, condition, what: str, timeout: float = 60):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; it reads:\n{driver.find_element('tag name', 'body').text}")


def screenshot(driver, path: Path) -> None:
    """The whole page, from its top: the viewport stretched to the document's height for one capture."""
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False})
    time.sleep(0.5)  # a frame to lay out at the new size
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_page_in_a_browser(browser, server, models, upload, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    def css(selector):
        return browser.find_elements(By.CSS_SELECTOR, selector)

    browser.get(server)
    wait_for(browser, lambda d: css("#upload input[type=file]"), "the upload box")

    # A built-in held-out image, picked from its gallery, becomes the input.
    wait_for(browser, lambda d: len(css("#builtins img")) == len(models.held_out), "the built-in images")
    css("#builtins .thumbnail-item")[2].click()
    wait_for(browser, lambda d: "Picked held-out #2" in d.find_element(By.ID, "tok-status").text
             and css("#input-preview img"), "the picked image")

    # Tokenizer tab: upload the image, ask for k = 1 and all (every count in screenshot mode), reconstruct.
    css("#upload input[type=file]")[0].send_keys(str(upload))
    wait_for(browser, lambda d: "Image loaded" in d.find_element(By.ID, "tok-status").text, "the upload's status")
    asked = {"1", "2", "4", "all"} if SCREENSHOTS else {"1", "all"}
    for box in css("#counts input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("name") in asked):
            box.click()
    css("#reconstruct")[0].click()

    def captions(d):
        found = CAPTION.findall(d.find_element(By.ID, "gallery").text)
        return found if len(found) == len(asked) and len(css("#gallery img")) == len(asked) else None

    shown = wait_for(browser, captions, f"{len(asked)} reconstructions with their PSNR")
    expected = handlers.reconstruct_gallery(models, str(upload), sorted(asked))
    assert [int(k) for k, _, _ in shown] == expected.counts
    assert [float(p) for _, p, _ in shown] == [round(p, 2) for p in expected.psnr]  # the handler's numbers
    assert float(shown[-1][1]) > float(shown[0][1]), shown  # all tokens beat the first one alone
    wait_for(browser, lambda d: css("#plot img") and css("#first-k-image img"), "the plot and the first-k image")
    if SCREENSHOTS:
        screenshot(browser, Path(SCREENSHOTS) / "demo_tokenizer.png")

    # The "first k tokens" slider: a click at its left end (k = 1) redraws the one image from the first token alone.
    def first_k_pixels():
        images = css("#first-k-image img")
        if not images or not images[0].get_attribute("src"):
            return None
        with urllib.request.urlopen(images[0].get_attribute("src"), timeout=10) as response:
            return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))

    shown_k = int(css("#first-k input[type=number]")[0].get_attribute("value"))  # drawn after Reconstruct
    assert shown_k != 1
    assert np.array_equal(first_k_pixels(), np.asarray(handlers.first_k_image(models, str(upload), shown_k)[0]))
    before = css("#first-k-image img")[0].get_attribute("src")
    track = css("#first-k input[type=range]")[0]
    ActionChains(browser).move_to_element_with_offset(track, -track.size["width"] // 2 + 1, 0).click().perform()
    wait_for(browser, lambda d: css("#first-k input[type=number]")[0].get_attribute("value") == "1"
             and css("#first-k-image img") and css("#first-k-image img")[0].get_attribute("src") != before,
             "the first-k image redrawn at k = 1")
    assert np.array_equal(first_k_pixels(), np.asarray(handlers.first_k_image(models, str(upload), 1)[0]))

    # Generation tab: its first two classes, four samples each, by default.
    css("#tab-generation-button")[0].click()
    wait_for(browser, lambda d: css("#generate") and css("#generate")[0].is_displayed(), "the generation tab")
    css("#generate")[0].click()
    wait_for(browser, lambda d: len(css("#samples img")) == 8, "eight samples")
    links = wait_for(browser, lambda d: [a.get_attribute("href") for a in css("#downloads a")
                                         if a.get_attribute("href")] or None, "the download links")
    archive = next(link for link in links if link.split("?")[0].endswith("samples.npz"))
    with urllib.request.urlopen(archive, timeout=10) as response, \
            np.load(io.BytesIO(response.read())) as saved:
        assert saved["images"].shape == (8, *models.held_out.shape[2:], 3)
        assert saved["labels"].tolist() == [0] * 4 + [1] * 4
    status = browser.find_element(By.ID, "gen-status").text
    assert re.search(r"8 images in [\d.]+ s", status), status
    if SCREENSHOTS:
        screenshot(browser, Path(SCREENSHOTS) / "demo_generation.png")

    # Offline: the page fetched nothing but from this server (no CDN fonts, no telemetry).
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith(server) for url in fetched), [u for u in fetched if
                                                                       not u.startswith(server)]

    # A file that is not an image, in a fresh page: one line in the page, no traceback.
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"plain text, not pixels\n" * 20)
    browser.get(server)
    wait_for(browser, lambda d: css("#upload input[type=file]"), "the upload box")
    css("#upload input[type=file]")[0].send_keys(str(bad))
    message = wait_for(browser, lambda d: "cannot read image not-an-image.png" in d.find_element(By.TAG_NAME, "body")
                       .text and d.find_element(By.TAG_NAME, "body").text, "the bad upload's message")
    assert "Traceback" not in message
