"""Compiled sampling: `semanticist-fast export` packages of tiny random models, loaded in a fresh process that
imports no model code, reproduce the eager sampler with the same noise; each step matches its eager module.

One export (five AOTInductor packages, compiled with gcc: minutes on a loaded 2-core machine) is shared by the
module. The models are tiny but random everywhere (adaLN-Zero left at zero would make every output trivial), and
both guidance batches (class and decoder CFG) are on, so every branch of the traced steps carries signal.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import micro_tokenizer_run, randomized
from semanticist_fast.common.files import sha256_file
from semanticist_fast.config import from_dict, to_dict
from semanticist_fast.export import CompiledSampler
from semanticist_fast.export.package import export_sampler
from semanticist_fast.inference import SampleConfig, Tokenizer, load_generator, sample_images
from semanticist_fast.inference.generation import generate
from semanticist_fast.models.gpt import GPT, GPTConfig
from semanticist_fast.models.tokenizer import SemanticistTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 4
TOL = dict(rtol=1e-4, atol=5e-5)  # fp32, for outputs of order 1: Inductor's kernels sum in another order than eager's
# A second set of settings, all different from the export's defaults: the packages take any of them.
OTHER = dict(guidance=3.0, guidance_schedule="constant", temperature=0.9, head_steps=4, sampler="heun",
             decoder_guidance=2.5, decoder_steps="heun4")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("import sys; from semanticist_fast.cli import main; sys.exit(main(sys.argv[1:]))", *args)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny random tokenizer and AR checkpoints every export here is made from."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    run = micro_tokenizer_run("model.diffusion.sample_steps=euler3")  # 16 px pixel codec, 4 slots, flow decoder
    tok = randomized(SemanticistTokenizer(run.model), seed=1)
    tok_path = root / "tok.pt"
    torch.save({"kind": "tokenizer", "config": to_dict(run), "model": tok.state_dict(), "ema": tok.state_dict()},
               tok_path)
    # 3 of the 4 slots: the decoder step must fill the last with the null slot, as Tokenizer.decode does.
    cfg = GPTConfig(size="custom", layers=2, heads=2, dim=32, head_width=32, head_depth=2, num_classes=5,
                    num_tokens=3, head_sample_steps=6)
    gpt = randomized(GPT(cfg), seed=2)
    ar_path = root / "ar.pt"
    sample = {"guidance": 2.0, "head_steps": 6, "decoder_guidance": 1.5}
    torch.save({"kind": "autoregressive", "config": {"model": to_dict(cfg), "sample": sample,
                                                     "tokenizer": str(tok_path)},
                "model": gpt.state_dict(), "ema": gpt.state_dict()}, ar_path)
    return {"ar": ar_path, "tok": tok_path, "root": root}


@pytest.fixture(scope="module")
def exported(checkpoints):
    out = checkpoints["root"] / "compiled"
    cli("export", str(checkpoints["ar"]), "--out", str(out), "--batch", str(MAX_BATCH), "--device", "cpu")
    return {**checkpoints, "dir": out}


@pytest.fixture(scope="module")
def eager(exported):
    loaded = load_generator(exported["ar"], "cpu")
    return loaded.gpt, Tokenizer.from_checkpoint(exported["tok"], device="cpu")


@pytest.fixture(scope="module")
def compiled(exported):
    return CompiledSampler.load(exported["dir"])


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement relative to the output's scale (one raw network output may reach ~10 with random weights)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * max(1.0, expected.abs().max().item()))


def eager_settings(compiled: CompiledSampler, **overrides) -> SampleConfig:
    return from_dict(SampleConfig, compiled.resolved(**overrides))


FRESH_PROCESS = """
import sys, torch
torch.set_num_threads(1)
from semanticist_fast.export import CompiledSampler
sampler = CompiledSampler.load(sys.argv[1])
other = {other!r}
out = {{
    "default": sampler.sample_images(torch.tensor([0, 3, 4]), torch.Generator().manual_seed(0)),
    "other": sampler.sample_images(torch.tensor([2]), torch.Generator().manual_seed(1), **other),
    "modules": sorted(m for m in sys.modules if m.startswith("semanticist_fast")),
}}
torch.save(out, sys.argv[2])
"""


def test_packages_in_a_fresh_process_reproduce_eager_sampling(exported, eager, compiled, tmp_path):
    result = tmp_path / "result.pt"
    run_python(FRESH_PROCESS.format(other=OTHER), str(exported["dir"]), str(result))
    out = torch.load(result)
    # The runtime and the package's __init__ load only the sampler math (and the ground floor it stands on: the
    # per-sample noise helpers): no model, kernel or training code.
    assert all(m.startswith(("semanticist_fast.export", "semanticist_fast.diffusion", "semanticist_fast.common"))
               or m == "semanticist_fast" for m in out["modules"]), out["modules"]
    assert "semanticist_fast.export.package" not in out["modules"]
    gpt, tok = eager
    ref = sample_images(gpt, tok, torch.tensor([0, 3, 4]), eager_settings(compiled), torch.Generator().manual_seed(0))
    assert ref.shape == (3, 3, 16, 16) and ref.std() > 0.05  # the random models draw varied images
    torch.testing.assert_close(out["default"], ref, **TOL)
    other = sample_images(gpt, tok, torch.tensor([2]), eager_settings(compiled, **OTHER),
                          torch.Generator().manual_seed(1))
    torch.testing.assert_close(out["other"], other, **TOL)
    assert (other - ref[2:3]).abs().max() > 1e-2  # the other settings do change the images


def test_tokens_match_for_every_head_sampler_and_batch(eager, compiled):
    gpt, _ = eager
    for batch, sampler, steps in ((1, "sde", 5), (MAX_BATCH, "ode", 3), (2, "heun", 4)):
        labels = torch.arange(batch) % 5
        ours = compiled.generate(labels, torch.Generator().manual_seed(batch), sampler=sampler, head_steps=steps)
        ref = generate(gpt, labels, 2.0, "linear", 1.0, torch.Generator().manual_seed(batch), steps, sampler)
        assert ours.shape == (batch, 3, 16)
        assert_close_fp32(ours, ref)


def test_decoder_step_and_latent_decode_match_eager(eager, compiled):
    _, tok = eager
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(MAX_BATCH, 3, 16, generator=g)
    for steps, guidance in (("euler3", 1.5), ("heun2", 4.0), ("euler1", 1.0)):
        ours = compiled.decode(tokens, torch.Generator().manual_seed(0), decoder_steps=steps, decoder_guidance=guidance)
        ref = tok.decode(tokens, num_tokens=3, guidance=guidance, steps=steps,
                         generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours, ref, **TOL)
    x = torch.randn(2, 3, 16, 16, generator=g)
    for k in (3, 1):  # the token count is an input: the slots from k on are the null slots
        step = compiled.programs["decoder_step"](x, torch.tensor([100.0, 700.0]), tokens[:2], torch.tensor([k]),
                                                 torch.tensor(2.0))
        padded, keep = torch.cat([tokens[:2], torch.zeros(2, 1, 16)], dim=1), torch.tensor([k, k])
        with torch.no_grad():
            assert_close_fp32(step, tok.model.dit.forward_guided(x, torch.tensor([100.0, 700.0]), padded, 2.0, keep))
    with torch.no_grad():
        torch.testing.assert_close(compiled.programs["latent_decode"](x), tok.codec.decode(x).clamp(0, 1))


def test_ar_steps_write_the_caches_they_are_given(eager, compiled):
    """The caches are inputs the steps fill in place: after prefill + one decode step their written positions hold
    the eager model's keys and values, and the conditions match."""
    gpt, _ = eager
    rows = 2 * 3  # 3 images with their unconditional rows
    labels = torch.tensor([1, 2, 0, 5, 5, 5])
    token = torch.randn(rows, 1, 16, generator=torch.Generator().manual_seed(4))
    caches = [torch.full(gpt.cache_shape(rows), 7.0) for _ in range(2 * len(gpt.layers))]  # stale values
    first = compiled.programs["ar_prefill"](labels, *caches)
    second = compiled.programs["ar_decode"](token, torch.tensor([1]), *caches)
    with torch.no_grad():
        gpt.setup_caches(rows, torch.float32, "cpu")
        try:
            ref_first = gpt.diffloss.net.cond_embed(gpt(labels, None, torch.tensor([0]))[:, -1])
            ref_second = gpt.diffloss.net.cond_embed(gpt(None, token, torch.tensor([1]))[:, -1])
            ref_caches = [c for layer in gpt.layers for c in (layer.attention.kv_cache.k_cache,
                                                              layer.attention.kv_cache.v_cache)]
        finally:
            gpt.reset_caches()
    assert_close_fp32(first, ref_first)
    assert_close_fp32(second, ref_second)
    for ours, ref in zip(caches, ref_caches):
        assert_close_fp32(ours[:, :, :2], ref[:, :, :2])
        assert torch.equal(ours[:, :, 2:], torch.full_like(ours[:, :, 2:], 7.0))  # later positions untouched


def test_manifest_records_shapes_settings_and_checkpoints(exported, compiled):
    manifest = json.loads((exported["dir"] / "manifest.json").read_text())
    assert manifest["batch"] == {"min": 1, "max": MAX_BATCH}
    for kind, path in (("autoregressive", exported["ar"]), ("tokenizer", exported["tok"])):
        assert manifest["checkpoints"][kind] == {"path": str(path), "sha256": sha256_file(path)}
    assert manifest["sample"] == {"guidance": 2.0, "guidance_schedule": "linear", "temperature": 1.0, "head_steps": 6,
                                  "sampler": "sde", "decoder_guidance": 1.5, "decoder_steps": "euler3",
                                  "tokens": None}
    prefill = manifest["programs"]["ar_prefill"]
    assert prefill["inputs"][0] == {"name": "labels", "shape": ["2*batch"], "dtype": "int64"}
    assert prefill["inputs"][1] == {"name": "k_cache_0", "shape": ["2*batch", 2, 3, 16], "dtype": "float32"}
    assert prefill["outputs"] == [{"name": "out", "shape": ["2*batch", 32], "dtype": "float32"}]
    head = manifest["programs"]["head_step"]
    assert [i["shape"] for i in head["inputs"]] == [["batch", 16], [1], ["2*batch", 32], []]
    assert manifest["programs"]["decoder_step"]["outputs"][0]["shape"] == ["batch", 3, 16, 16]
    assert sorted(p.name for p in exported["dir"].iterdir()) == sorted(
        ["manifest.json"] + [f"{name}.pt2" for name in manifest["programs"]])


def test_bad_requests_fail_with_the_fix(exported, compiled, tmp_path):
    with pytest.raises(ValueError, match="batches of 1 to 4.*--batch 5"):
        compiled.generate(torch.arange(5) % 5)
    with pytest.raises(ValueError, match="0..4"):
        compiled.generate(torch.tensor([5]))
    with pytest.raises(ValueError, match="unknown sampling settings"):
        compiled.sample_images(torch.tensor([0]), cfg=2.0)
    with pytest.raises(ValueError, match="does not fit a flow head"):
        compiled.generate(torch.tensor([0]), sampler="dpm")
    with pytest.raises(ValueError, match=r"tokens must be \(B, n, 16\) with n in 1\.\.3"):
        compiled.decode(torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match=r"--tokens / sample.tokens 4: the AR model draws 3 tokens"):
        compiled.generate(torch.tensor([0]), tokens=4)
    with pytest.raises(FileNotFoundError, match="export the sampler first"):
        CompiledSampler.load(tmp_path)


def test_sample_cli_compiled_matches_the_checkpoint(exported, tmp_path):
    common = ["--classes", "1,4", "--per-class", "2", "--seed", "5", "--head-steps", "4", "--batch-size", "3"]
    cli("sample", "--compiled", str(exported["dir"]), *common, "--out", str(tmp_path / "compiled.png"))
    cli("sample", str(exported["ar"]), *common, "--out", str(tmp_path / "eager.png"), "--device", "cpu")
    compiled, eager = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "eager.npz")
    assert np.array_equal(compiled["labels"], eager["labels"])
    # uint8 images of the same samples: a rounding boundary may split them by one level, no more.
    assert np.abs(compiled["images"].astype(int) - eager["images"].astype(int)).max() <= 1
    assert compiled["images"].std() > 10


@pytest.mark.parametrize("k", [1, 2])
def test_first_k_tokens_compiled_match_eager_in_k_ar_steps(eager, compiled, k):
    gpt, tok = eager
    calls = {}

    def counted(name, program):
        def call(*args):
            calls[name] = calls.get(name, 0) + 1
            return program(*args)
        return call

    programs = dict(compiled.programs)
    compiled.programs.update({name: counted(name, p) for name, p in programs.items()})
    try:
        labels = torch.tensor([0, 3, 4])
        ours = compiled.sample_images(labels, torch.Generator().manual_seed(0), tokens=k, head_steps=4)
    finally:
        compiled.programs.update(programs)
    # The step loop stops after k tokens: one prefill, k - 1 decode steps, 4 head steps per token.
    assert calls["ar_prefill"] == 1 and calls.get("ar_decode", 0) == k - 1 and calls["head_step"] == 4 * k
    ref = sample_images(gpt, tok, labels, eager_settings(compiled, tokens=k, head_steps=4),
                        torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, ref, **TOL)
    full = compiled.sample_images(labels, torch.Generator().manual_seed(0), head_steps=4)
    assert (full - ours).abs().max() > 1e-2
    # Decoding all 3 drawn tokens with tokens=k nulls the rest, as Tokenizer.decode(num_tokens=k) does.
    tokens = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    ref = tok.decode(tokens, num_tokens=k, guidance=1.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled.decode(tokens, torch.Generator().manual_seed(0), tokens=k), ref, **TOL)


def test_an_export_from_before_k_samples_all_tokens_only(exported, compiled):
    """An older export's decoder step has no token-count input: all N tokens still sample, k < N asks for a
    re-export."""
    manifest = json.loads(json.dumps(compiled.manifest))
    inputs = manifest["programs"]["decoder_step"]["inputs"]
    manifest["programs"]["decoder_step"]["inputs"] = [i for i in inputs if i["name"] != "num_tokens"]
    del manifest["sample"]["tokens"]
    old = CompiledSampler(exported["dir"], manifest, compiled.programs, compiled.device)
    assert old.resolved()["tokens"] is None
    with pytest.raises(ValueError, match="re-export it to sample with --tokens 2"):
        old.sample_images(torch.tensor([0]), tokens=2)


def test_sample_cli_first_tokens_compiled_matches_the_checkpoint(exported, tmp_path):
    common = ["--classes", "0,2", "--per-class", "2", "--seed", "3", "--head-steps", "4", "--tokens", "2"]
    cli("sample", "--compiled", str(exported["dir"]), *common, "--out", str(tmp_path / "compiled.png"))
    cli("sample", str(exported["ar"]), *common, "--out", str(tmp_path / "eager.png"), "--device", "cpu")
    compiled, eager = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "eager.npz")
    assert np.abs(compiled["images"].astype(int) - eager["images"].astype(int)).max() <= 1
    assert eager["images"].shape == (4, 16, 16, 3) and eager["images"].std() > 10
    bad = subprocess.run([sys.executable, "-m", "semanticist_fast", "sample", str(exported["ar"]), "--tokens", "4",
                          "--out", str(tmp_path / "bad.png"), "--device", "cpu"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert bad.returncode == 2 and "--tokens / sample.tokens 4: the AR model draws 3 tokens, so k must be in 1..3" \
        in bad.stderr


@pytest.fixture(scope="module")
def unguided_ddpm(tmp_path_factory):
    """The other branch of every step: a DDPM decoder with learned variance and a DDPM head, both unguided (no CFG
    batch), exported uncompiled (torch.export.save: no gcc, so cheap) and run by the same runtime."""
    root = tmp_path_factory.mktemp("export_ddpm")
    torch.manual_seed(0)
    run = micro_tokenizer_run("model.diffusion.objective=ddpm", "model.decoder.learn_sigma=true",
                              "model.diffusion.sample_steps=dpm6")
    tok = randomized(SemanticistTokenizer(run.model), seed=3)
    torch.save({"kind": "tokenizer", "config": to_dict(run), "model": tok.state_dict(), "ema": tok.state_dict()},
               root / "tok.pt")
    cfg = GPTConfig(size="custom", layers=1, heads=2, dim=32, head_width=32, head_depth=2, num_classes=5,
                    num_tokens=4, head_sample_steps=5, head_objective="ddpm")
    gpt = randomized(GPT(cfg), seed=4)
    torch.save({"kind": "autoregressive", "config": {"model": to_dict(cfg), "sample": {"guidance": 1.0},
                                                     "tokenizer": str(root / "tok.pt")},
                "model": gpt.state_dict(), "ema": gpt.state_dict()}, root / "ar.pt")
    export_sampler(root / "ar.pt", root / "exported", max_batch=3, device="cpu", compile=False, progress=False,
                   decoder_guidance=1.0)
    loaded = load_generator(root / "ar.pt", "cpu")
    return CompiledSampler.load(root / "exported"), loaded.gpt, Tokenizer.from_checkpoint(root / "tok.pt", device="cpu")


@pytest.mark.parametrize("head_sampler,decoder_steps", [("sde", "dpm6"), ("dpm", "ddim4"), ("ode", "20")])
def test_unguided_ddpm_export_reproduces_eager(unguided_ddpm, head_sampler, decoder_steps):
    sampler, gpt, tok = unguided_ddpm
    assert not sampler.manifest["compiled"] and not sampler.manifest["ar"]["guided"]
    assert [i["name"] for i in sampler.manifest["programs"]["decoder_step"]["inputs"]] == ["x", "t", "tokens",
                                                                                          "num_tokens"]
    assert sampler.manifest["programs"]["decoder_step"]["outputs"][0]["shape"] == ["batch", 6, 16, 16]
    settings = dict(sampler=head_sampler, decoder_steps=decoder_steps, head_steps=5)
    labels = torch.tensor([4, 0, 2])
    ours = sampler.sample_images(labels, torch.Generator().manual_seed(2), **settings)
    ref = sample_images(gpt, tok, labels, eager_settings(sampler, **settings), torch.Generator().manual_seed(2))
    assert ref.std() > 0.05
    torch.testing.assert_close(ours, ref, **TOL)
    with pytest.raises(ValueError, match="re-export with --guidance 2.0"):
        sampler.generate(labels, guidance=2.0)
    with pytest.raises(ValueError, match="--decoder-guidance 3.0"):
        sampler.decode(torch.zeros(1, 4, 16), decoder_guidance=3.0)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: benchmarks/gpu_suite.sh runs it (cuda_graph_replay, export_cuda)")


@needs_cuda
def test_graphed_call_replays_and_writes_state_in_place():
    from semanticist_fast.export.cuda_graphs import GraphedCall

    def step(x, pos, cache):
        cache.index_copy_(1, pos, x)
        return cache.sum(1)

    cache = torch.zeros(2, 4, 3, device="cuda")
    graphed = GraphedCall(step, state=(2,))
    ref_cache = cache.clone()
    for p in range(4):
        x = torch.randn(2, 1, 3, device="cuda")
        out = graphed(x, torch.tensor([p], device="cuda"), cache)
        torch.testing.assert_close(out, step(x, torch.tensor([p], device="cuda"), ref_cache))
    torch.testing.assert_close(cache, ref_cache)


# ---- on CUDA (benchmarks/gpu_suite.sh): the export on CUDA, and the CompiledSampler's graphed path ----


@pytest.fixture(scope="module")
def exported_cuda(checkpoints):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    out = checkpoints["root"] / "compiled_cuda"
    cli("export", str(checkpoints["ar"]), "--out", str(out), "--batch", str(MAX_BATCH), "--device", "cuda")
    return {**checkpoints, "dir": out}


@needs_cuda
def test_cuda_export_reproduces_eager_sampling_on_cuda(exported_cuda):
    """The CUDA packages, stepped without graphs, against the eager models on CUDA with the same noise (the
    plain PyTorch paths, as the packages trace them)."""
    from semanticist_fast.kernels import dispatch

    sampler = CompiledSampler.load(exported_cuda["dir"], use_cuda_graphs=False)
    assert sampler.device.type == "cuda"
    gpt = load_generator(exported_cuda["ar"], "cuda").gpt
    tok = Tokenizer.from_checkpoint(exported_cuda["tok"], device="cuda")
    labels = torch.tensor([0, 3, 4], device="cuda")
    ours = sampler.sample_images(labels, torch.Generator("cuda").manual_seed(0))
    dispatch.set_fast_paths(False)
    try:
        ref = sample_images(gpt, tok, labels, eager_settings(sampler), torch.Generator("cuda").manual_seed(0))
    finally:
        dispatch.set_fast_paths(True)
    assert ref.shape == (3, 3, 16, 16) and ref.std() > 0.05
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)  # Inductor's CUDA kernels sum in another order


@needs_cuda
def test_compiled_sampler_graphed_path_equals_ungraphed(exported_cuda):
    """CUDA graphs (the default for a CUDA export) replay the same steps: equal images for every batch size,
    sampler and setting, captured once per batch and replayed."""
    graphed = CompiledSampler.load(exported_cuda["dir"])
    plain = CompiledSampler.load(exported_cuda["dir"], use_cuda_graphs=False)
    for batch, settings in ((1, {}), (MAX_BATCH, OTHER), (2, {}), (1, OTHER)):
        labels = torch.arange(batch, device="cuda") % 5
        ours = graphed.sample_images(labels, torch.Generator("cuda").manual_seed(batch), **settings)
        ref = plain.sample_images(labels, torch.Generator("cuda").manual_seed(batch), **settings)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
