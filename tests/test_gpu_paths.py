"""The GPU-only paths, held on the CPU where their behaviour shows without a GPU (issue 28): the AOTI loader under
CUDA graphs, the sampling precision, the ZeRO step's host syncs, the flash dispatch under compile, DINOv2's fp32
constants. The tests marked `cuda` run only on a GPU: benchmarks/gpu_suite.sh runs each as a step.
"""
import warnings

import pytest
import torch

from semanticist_fast.engine.zero import DeepSpeedOptimizerStep
from semanticist_fast.export import runtime

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by benchmarks/gpu_suite.sh)")


# ---- 1. AOTI packages under CUDA graphs ---------------------------------------------------------------------------
def _manifest():
    inputs = [{"shape": [2, 3], "dtype": "float32"}] * 3
    return {"compiled": True, "programs": {name: {"file": f"{name}.pt2", "inputs": inputs}
                                           for name in ("ar_prefill", "ar_decode", "head_step", "latent_decode")}}


@pytest.mark.parametrize("graphs", [True, False])
def test_packages_load_single_threaded_exactly_when_graphed(monkeypatch, tmp_path, graphs):
    calls = []

    def fake_load(path, run_single_threaded=False, device_index=-1):
        calls.append((path, run_single_threaded))
        return lambda *args: args[0]

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    programs = runtime.load_programs(tmp_path, _manifest(), graphs)
    assert [flag for _, flag in calls] == [graphs] * 4
    assert {path for path, _ in calls} == {str(tmp_path / f"{n}.pt2") for n in _manifest()["programs"]}
    graphed = {name for name, p in programs.items() if isinstance(p, runtime.GraphedCall)}
    assert graphed == ({"ar_prefill", "ar_decode", "head_step"} if graphs else set())


# ---- 3. the ZeRO step leaves the norm (and the skip it carries) on the device -------------------------------------
class _CountingTensor(torch.Tensor):
    """A grad norm that counts every conversion to a Python value (each one a device-to-host sync on a GPU)."""
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class _FakeZeroOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 0.0}]
        self.overflow_reads = 0

    @property
    def overflow(self):
        self.overflow_reads += 1
        return False


class _FakeEngine:
    def __init__(self, norm):
        self.norm, self.steps = norm, 0

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return self.norm


def _zero_step(norm):
    step = object.__new__(DeepSpeedOptimizerStep)  # DeepSpeed itself is not needed to call step()
    step.engine, step.zero_optimizer, step.device = _FakeEngine(norm), _FakeZeroOptimizer(), torch.device("cpu")
    return step


def test_zero_step_returns_the_device_norm_without_a_host_read():
    _CountingTensor.reads = 0
    norm = torch.tensor(2.5).as_subclass(_CountingTensor)
    step = _zero_step(norm)
    out = [step.step(lr=1e-3) for _ in range(5)]
    assert step.engine.steps == 5 and step.zero_optimizer.param_groups[0]["lr"] == 1e-3
    assert step.zero_optimizer.overflow_reads == 0 and _CountingTensor.reads == 0
    assert all(o.dtype == torch.float32 and float(o) == 2.5 for o in out)


def test_zero_step_reports_a_skipped_step_as_an_infinite_norm():
    out = _zero_step(float("inf")).step(lr=1e-3)  # what DeepSpeed stores when it skipped the step
    assert out.dtype == torch.float32 and torch.isinf(out)
    with pytest.raises(RuntimeError, match="compute_grad_norm"):
        _zero_step(None).step(lr=1e-3)


# ---- 6. a bf16 teacher keeps DINOv2's fp32 constants --------------------------------------------------------------
def test_bf16_teacher_keeps_fp32_preprocessing_and_position_embedding():
    from semanticist_fast.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, small_test_dinov2

    model, _ = small_test_dinov2()
    pos_fp32 = model.pos_embed_resized.clone()
    assert pos_fp32.shape[1] != model.pos_embed.shape[1]  # resampled (56 px input, 98 px stored grid)
    model.to(torch.bfloat16)  # what the tokenizer task does to its teacher on a GPU
    assert model.patch_embed.proj.weight.dtype == torch.bfloat16 and model.pos_embed.dtype == torch.bfloat16
    assert model.image_mean.dtype == model.image_std.dtype == model.pos_embed_resized.dtype == torch.float32
    torch.testing.assert_close(model.pos_embed_resized, pos_fp32, rtol=0, atol=0)
    # The official preprocessing: bicubic resize, then torchvision's Normalize with the fp32 ImageNet constants.
    images = torch.rand(2, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(images, size=(56, 56), mode="bicubic")
    expected = (resized - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(images), expected, rtol=0, atol=0)
    model.to(torch.float32)  # a later cast back leaves the constants as they were
    torch.testing.assert_close(model.pos_embed_resized, pos_fp32, rtol=0, atol=0)


# ---- 4. flash-attn v4 only where it can run: its head dims, outside a compile trace -------------------------------
def _sdpa_blhd(q, k, v, causal=False):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal)
    return out.transpose(1, 2)


@pytest.fixture
def flash_v4_and_v2(monkeypatch):
    """Stand-ins for flash-attn v4 (flash_attn.cute: launches from Python, which dynamo cannot trace) and v2,
    installed as modules, v3 absent; the dispatch re-imports them."""
    import types

    from semanticist_fast.kernels import dispatch

    calls = {"v4": 0, "v2": 0}

    def v4(q, k, v, causal=False):
        calls["v4"] += 1
        torch._dynamo.graph_break()  # what cute.compile / dlpack do to a trace
        return _sdpa_blhd(q, k, v, causal), None  # v4 also returns the log-sum-exp

    def v2(q, k, v, causal=False):
        calls["v2"] += 1
        return _sdpa_blhd(q, k, v, causal)

    v2_module, v4_module = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    v2_module.flash_attn_func, v4_module.flash_attn_func, v2_module.cute = v2, v4, v4_module
    monkeypatch.setitem(__import__("sys").modules, "flash_attn_interface", None)  # v3: not installed
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", v2_module)
    monkeypatch.setitem(__import__("sys").modules, "flash_attn.cute", v4_module)
    monkeypatch.setattr(dispatch, "_FLASH", dispatch._import_flash_attn())
    assert dispatch._FLASH["func"] is v4 and dispatch._FLASH["fallback"] is v2
    return dispatch, calls


def _qkv(head_dim: int):
    g = torch.Generator().manual_seed(head_dim)
    return [torch.randn(2, 3, 10, head_dim, generator=g) for _ in range(3)]  # (B, H, N, Dh)


def test_flash_v4_takes_its_head_dims_eagerly_and_v2_the_others(flash_v4_and_v2):
    dispatch, calls = flash_v4_and_v2
    for head_dim, used in ((64, "v4"), (72, "v2"), (128, "v4")):
        q, k, v = _qkv(head_dim)
        before = dict(calls)
        out = dispatch._flash(q, k, v, causal=True)
        assert {name: calls[name] - before[name] for name in calls} == {"v4": used == "v4", "v2": used == "v2"}
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_flash_v4_is_never_traced_by_a_fullgraph_compile(flash_v4_and_v2):
    dispatch, calls = flash_v4_and_v2
    q, k, v = _qkv(64)
    compiled = torch.compile(lambda q, k, v: dispatch._flash(q, k, v, causal=False) * 2, fullgraph=True,
                             backend="eager")
    torch._dynamo.reset()
    out = compiled(q, k, v)
    assert calls["v4"] == 0 and calls["v2"] >= 1
    torch.testing.assert_close(out, 2 * torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_without_a_traceable_flash_the_compiled_and_odd_head_dim_paths_take_sdpa(flash_v4_and_v2, monkeypatch):
    dispatch, calls = flash_v4_and_v2
    monkeypatch.setitem(dispatch._FLASH, "fallback", None)  # v4 alone
    assert dispatch._flash_func(_qkv(72)[0]) is None
    assert dispatch._flash_func(_qkv(96)[0]) is dispatch._FLASH["func"]
    picked = []
    torch._dynamo.reset()
    torch.compile(lambda q: picked.append(dispatch._flash_func(q)) or q + 1, fullgraph=True, backend="eager")(
        _qkv(64)[0])
    assert picked == [None]


# ---- 2. the sampling precision: bf16 autocast and TF32 on a GPU, by one setting ---------------------------------
def test_precision_settings_per_device():
    from semanticist_fast.common.device import effective_precision, precision_settings

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision_settings(cuda, "bf16") == (True, "high", True)
    assert precision_settings(cuda, "tf32") == (False, "high", True)
    assert precision_settings(cuda, "fp32") == (False, "highest", False)
    assert all(precision_settings(cpu, p) == (False, None, None) for p in ("bf16", "tf32", "fp32"))
    assert effective_precision(cuda, "bf16") == "bf16" and effective_precision(cpu, "bf16") == "fp32"
    with pytest.raises(ValueError, match="'fp16'.*bf16.*tf32.*fp32"):
        precision_settings(cuda, "fp16")


@pytest.mark.parametrize("precision, autocast, matmul, cudnn", [("bf16", True, "high", True),
                                                                ("tf32", False, "high", True),
                                                                ("fp32", False, "highest", False)])
def test_inference_precision_on_a_gpu_device_sets_and_restores(monkeypatch, precision, autocast, matmul, cudnn):
    import contextlib

    from semanticist_fast.common.device import inference_precision

    entered = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: entered.append((device_type, dtype))
                        or contextlib.nullcontext())  # a CPU build of torch disables CUDA autocast on entry
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("medium")  # a user's own setting comes back afterwards
    try:
        with inference_precision(torch.device("cuda"), precision):
            assert torch.get_float32_matmul_precision() == matmul and torch.backends.cudnn.allow_tf32 == cudnn
        assert entered == ([("cuda", torch.bfloat16)] if autocast else [])
        assert torch.get_float32_matmul_precision() == "medium"
        with inference_precision(torch.device("cpu"), precision):
            assert torch.get_float32_matmul_precision() == "medium"
        assert len(entered) == (1 if autocast else 0)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.fixture
def micro_models():
    from helpers import micro_tokenizer_run, randomized
    from semanticist_fast.inference import Tokenizer
    from semanticist_fast.models.gpt import GPT, GPTConfig
    from semanticist_fast.models.latent_codec import build_codec
    from semanticist_fast.models.tokenizer import SemanticistTokenizer

    def make(device="cpu", precision="bf16"):
        torch.manual_seed(0)
        run = micro_tokenizer_run("model.diffusion.sample_steps=euler3")
        tok = Tokenizer(randomized(SemanticistTokenizer(run.model), seed=1), build_codec(run.model.codec), device,
                        precision)
        cfg = GPTConfig(size="custom", layers=2, heads=2, dim=32, head_width=32, head_depth=2, num_classes=5,
                        num_tokens=3, head_sample_steps=6)
        return randomized(GPT(cfg), seed=2).to(device), tok

    return make


def test_tokenizer_and_sampling_run_in_the_tokenizers_precision(micro_models, monkeypatch):
    import contextlib

    from semanticist_fast.inference import SampleConfig, generation, sample_images, tokenizer_api

    seen = []

    def recording(device, precision):
        seen.append((torch.device(device).type, precision))
        return contextlib.nullcontext()

    monkeypatch.setattr(tokenizer_api, "inference_precision", recording)
    monkeypatch.setattr(generation, "inference_precision", recording)
    gpt, tok = micro_models(precision="tf32")
    images = sample_images(gpt, tok, torch.tensor([1, 2]), SampleConfig(guidance=1.0, head_steps=2),
                           torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    assert seen == [("cpu", "tf32"), ("cpu", "tf32")]  # the AR tokens, then the decoder
    tok.encode(torch.rand(1, 3, 16, 16))
    assert seen[-1] == ("cpu", "tf32")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        type(tok)(tok.model, tok.codec, "cpu", "half")


def test_cli_precision_option():
    from semanticist_fast.cli import _precision, build_parser

    parser = build_parser()
    for argv in (["sample", "ck"], ["reconstruct", "ck"], ["eval", "gen", "ck"], ["eval", "recon", "ck"],
                 ["export", "ck", "--out", "x"], ["demo", "--tokenizer", "t"]):
        assert _precision(parser.parse_args(argv)) == "bf16"
        assert _precision(parser.parse_args(argv + ["--precision", "fp32"])) == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "ck", "--precision", "fp16"])


# ---- GPU-only checks (benchmarks/gpu_suite.sh runs each as a step) -------------------------------------------------
@needs_cuda
def test_cuda_bf16_sampling_tracks_fp32(micro_models):
    """bf16 autocast really runs on the GPU (the flash path's dtype) and stays near fp32 sampling."""
    from semanticist_fast.inference import SampleConfig, sample_images

    out = {}
    for precision in ("fp32", "bf16"):
        gpt, tok = micro_models("cuda", precision)
        dtypes = []
        hook = tok.model.dit.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        out[precision] = sample_images(gpt, tok, torch.tensor([1, 2, 3], device="cuda"),
                                       SampleConfig(guidance=1.0, head_steps=4), torch.Generator("cuda").manual_seed(0))
        hook.remove()
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    diff = (out["bf16"] - out["fp32"]).abs()
    print(f"bf16 vs fp32 images: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    assert out["bf16"].dtype == torch.float32 and torch.isfinite(out["bf16"]).all() and diff.mean() < 0.05


@needs_cuda
def test_cuda_flash_dispatch_under_fullgraph_compile():
    """The installed flash-attn (if any) inside a fullgraph compile, for DiT-XL's head dim 72 and for 64."""
    from semanticist_fast.kernels import dispatch

    print("flash:", {k: getattr(v, "__module__", v) for k, v in dispatch._FLASH.items() if k != "limits"})
    for head_dim in (64, 72):
        q, k, v = (torch.randn(2, 4, 256, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        torch._dynamo.reset()
        out = torch.compile(lambda q, k, v: dispatch.attention(q, k, v), fullgraph=True)(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_cuda_zero_step_adds_no_host_sync(monkeypatch):
    """One ZeRO-2 step under torch's sync debug mode: no sync comes from our code (DeepSpeed's own are counted)."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from semanticist_fast.engine.train_config import OptimConfig, TrainConfig

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29531"}.items():
        monkeypatch.setenv(key, value)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).cuda()
    step = DeepSpeedOptimizerStep(model, lambda m, x: m(x).square().mean(),
                                  TrainConfig(batch_size=8, micro_batch_size=8, engine="deepspeed", zero_stage=2),
                                  OptimConfig(), 1e-3, 1, torch.device("cuda"))
    x = torch.randn(8, 64, device="cuda")
    try:
        for _ in range(2):  # warm-up: DeepSpeed allocates its buffers on the first steps
            step.backward(step.loss(x))
            step.step(1e-3)
        step.backward(step.loss(x))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                norm = step.step(1e-3)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"host syncs in one ZeRO-2 step: {len(syncs)}, at", sorted({f"{w.filename}:{w.lineno}" for w in syncs}))
        assert norm.is_cuda and not [w for w in syncs if "semanticist_fast" in w.filename]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@needs_cuda
def test_cuda_bf16_export_replays_from_cuda_graphs(micro_models, tmp_path):
    """A compiled bf16 CUDA export loaded with CUDA graphs on (the default): capture succeeds (the packages load
    single-threaded), replays are deterministic, and the images stay near eager bf16 sampling."""
    from semanticist_fast.export import CompiledSampler
    from semanticist_fast.export.package import export_sampler
    from semanticist_fast.inference import SampleConfig, sample_images

    gpt, tok = micro_models("cuda", "bf16")
    ar_path = _write_checkpoints(gpt, tok, tmp_path)
    export_sampler(ar_path, tmp_path / "export", max_batch=2, static_batch=True, device="cuda", precision="bf16",
                   progress=False)
    sampler = CompiledSampler.load(tmp_path / "export")
    assert sampler.manifest["precision"] == "bf16" and sampler.manifest["ar"]["cache_dtype"] == "bfloat16"
    labels = torch.tensor([1, 3], device="cuda")
    first = sampler.sample_images(labels, torch.Generator("cuda").manual_seed(0))
    again = sampler.sample_images(labels, torch.Generator("cuda").manual_seed(0))
    assert any(isinstance(p, runtime.GraphedCall) and p.graphs for p in sampler.programs.values())
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    eager = sample_images(gpt, tok, labels, SampleConfig(**sampler.settings),
                          torch.Generator("cuda").manual_seed(0))
    diff = (first - eager).abs()
    print(f"compiled bf16 (graphs) vs eager bf16: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    assert first.dtype == torch.float32 and torch.isfinite(first).all() and diff.mean() < 0.05


def _write_checkpoints(gpt, tok, root):
    from helpers import micro_tokenizer_run
    from semanticist_fast.config import to_dict

    tok_path, ar_path = root / "tok.pt", root / "ar.pt"
    run = to_dict(micro_tokenizer_run("model.diffusion.sample_steps=euler3"))
    torch.save({"kind": "tokenizer", "config": run, "model": tok.model.state_dict(), "ema": tok.model.state_dict()},
               tok_path)
    torch.save({"kind": "autoregressive", "config": {"model": to_dict(gpt.config), "sample": {"guidance": 2.0,
                "head_steps": 4}, "tokenizer": str(tok_path)}, "model": gpt.state_dict(), "ema": gpt.state_dict()},
               ar_path)
    return ar_path


def test_bf16_export_traces_the_steps_under_autocast(micro_models, tmp_path, monkeypatch):
    """The bf16 export path, run on the CPU with CPU bf16 autocast standing in for CUDA's (uncompiled programs):
    the steps trace with the casts inside, the caches are bf16, the outputs fp32, and sampling follows eager
    sampling under the same autocast."""
    from semanticist_fast.export import CompiledSampler, package
    from semanticist_fast.inference import SampleConfig, generate

    monkeypatch.setattr(package, "effective_precision", lambda device, precision: precision)
    gpt, tok = micro_models("cpu")
    package.export_sampler(_write_checkpoints(gpt, tok, tmp_path), tmp_path / "export", max_batch=2, device="cpu",
                         compile=False, progress=False, precision="bf16")
    sampler = CompiledSampler.load(tmp_path / "export")
    assert sampler.manifest["precision"] == "bf16" and sampler.manifest["ar"]["cache_dtype"] == "bfloat16"
    assert all(p["outputs"][0]["dtype"] == "float32" for p in sampler.manifest["programs"].values())
    labels = torch.tensor([1, 3])
    ours = sampler.generate(labels, torch.Generator().manual_seed(0))
    s = SampleConfig(**sampler.settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = generate(gpt, labels, s.guidance, s.guidance_schedule, s.temperature, torch.Generator().manual_seed(0),
                       s.head_steps, s.sampler)
    with torch.no_grad():
        plain = generate(gpt, labels, s.guidance, s.guidance_schedule, s.temperature,
                         torch.Generator().manual_seed(0), s.head_steps, s.sampler)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    assert (ours - plain).abs().max() > 1e-2  # the casts are in the graphs: fp32 sampling differs
    images = sampler.decode(ours, torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
