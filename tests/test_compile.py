"""Regional torch.compile equals eager; the analytic FLOP model matches a FLOP counter and the spec; bench smoke.

Compiling on CPU is slow (a few seconds per graph), so the models are tiny and share their shapes between tests:
the inductor cache then serves the tokenizer step test the graphs the block test built.
"""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.flop_counter as flop_counter
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed: use the checkout's
from benchmarks import bench_train  # noqa: E402
from semanticist_fast.plan import flops  # noqa: E402
from helpers import micro_tokenizer_run  # noqa: E402
from semanticist_fast.common.runs import list_checkpoints  # noqa: E402
from semanticist_fast.engine.checkpoint import consolidated_slices  # noqa: E402
from semanticist_fast.kernels import dispatch  # noqa: E402
from semanticist_fast.engine.compile import compile_blocks  # noqa: E402
from semanticist_fast.models.dinov2 import small_test_dinov2  # noqa: E402
from semanticist_fast.models.dit import DecoderConfig  # noqa: E402
from semanticist_fast.models.gpt import GPT, GPTConfig  # noqa: E402
from semanticist_fast.models.latent_codec import CodecConfig  # noqa: E402
from semanticist_fast.models.tokenizer import SemanticistTokenizer, TokenizerConfig  # noqa: E402
from semanticist_fast.models.vae_kl import AutoencoderKL, VAEConfig  # noqa: E402
from semanticist_fast.models.vit import EncoderConfig  # noqa: E402
from semanticist_fast.inference.generation import generate  # noqa: E402
from semanticist_fast.tasks import train as train_tokenizer  # noqa: E402

# Two encoder blocks with drop-path rates 0 and 0.1 (two graphs), one DiT block, batch 8: the micro tokenizer.
TOKENIZER_OVERRIDES = ("model.encoder.depth=2", "model.encoder.drop_path=0.1")
BATCH = 8


@pytest.fixture(autouse=True)
def _compile_env(monkeypatch):
    # One thread: the thread count is part of every graph's guards, and toy shapes only lose to more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    # Random ops in compiled graphs draw from the eager generator in eager order, so dropout matches exactly.
    # (config.patch, not monkeypatch: undoing a monkeypatch deletes the key from inductor's config module.)
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()
    dispatch.set_fast_paths(True)
    torch.set_num_threads(threads)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere: adaLN-Zero would otherwise make every block the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
    return model


def graphs_built(fn) -> int:
    before = counters["stats"]["unique_graphs"]
    fn()
    return counters["stats"]["unique_graphs"] - before


def assert_same_training(compiled: torch.nn.Module, eager: torch.nn.Module, loss_fn, tol: float = 1e-4) -> None:
    """loss_fn(model) and every parameter gradient agree, with the same random draws on both sides."""
    torch.manual_seed(1)
    loss_c = loss_fn(compiled)
    loss_c.backward()
    torch.manual_seed(1)
    loss_e = loss_fn(eager)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=tol, atol=tol)
    grads_c = dict(compiled.named_parameters())
    checked = 0
    for name, p in eager.named_parameters():
        if p.grad is None:
            assert grads_c[name].grad is None, name
            continue
        scale = max(p.grad.abs().max().item(), 1.0)
        torch.testing.assert_close(grads_c[name].grad, p.grad, rtol=tol, atol=tol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked > 0


def micro_tokenizer(seed: int = 0) -> SemanticistTokenizer:
    torch.manual_seed(seed)
    return randomized(SemanticistTokenizer(micro_tokenizer_run(*TOKENIZER_OVERRIDES).model), seed).train()


def tiny_gpt(seed: int = 0) -> GPT:
    # Odd widths (head dim 10), dropout on, both blocks in their training form.
    cfg = GPTConfig(size="custom", layers=2, heads=4, dim=40, head_width=24, head_depth=2, num_classes=10,
                    num_tokens=7, head_sample_steps=6)
    torch.manual_seed(seed)
    return randomized(GPT(cfg), seed).train()


# ---- regional compile -------------------------------------------------------------------------------------------

def test_compile_blocks_counts_and_keeps_the_module_tree():
    model = micro_tokenizer()
    keys = list(model.state_dict())
    assert compile_blocks(model) == 2 + 1 + 1  # encoder blocks, DiT blocks, DiT final layer
    assert list(model.state_dict()) == keys
    gpt = tiny_gpt()
    assert compile_blocks(gpt) == 2 + 2 + 1  # transformer blocks, head residual blocks, head output layer
    copied = copy.deepcopy(gpt)  # the EMA copy: eager again, bound to its own weights
    assert all(m._compiled_call_impl is None for m in copied.modules())


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_tokenizer_blocks_compiled_match_eager(fast):
    dispatch.set_fast_paths(fast)  # on: the split slot attention and the C++ token ops between the blocks
    # compile_blocks must raise the limit itself: the two drop-path rates need two encoder graphs.
    with torch._dynamo.config.patch(recompile_limit=1):
        model = micro_tokenizer()
        eager = copy.deepcopy(model)
        compile_blocks(model)  # fullgraph=True: any graph break raises
        g = torch.Generator().manual_seed(2)
        images = torch.rand(BATCH, 3, 16, 16, generator=g)
        keep = torch.randint(0, model.num_slots + 1, (BATCH,), generator=g)
        x_t, t = torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 1000, (BATCH,), generator=g)
        weight = torch.randn(BATCH, model.dit.out_channels, 16, 16, generator=g)

        def loss(m):
            return (m.dit(x_t, t, m.encode(images), keep) * weight).sum()

        built = graphs_built(lambda: assert_same_training(model, eager, loss))
        assert built == 2 + 1 + 1  # one per drop-path rate, one DiT block graph, the final layer


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_gpt_blocks_compiled_match_eager(fast):
    dispatch.set_fast_paths(fast)
    model = tiny_gpt()
    eager = copy.deepcopy(model)
    compile_blocks(model)
    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randn(BATCH, 7, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    built = graphs_built(lambda: assert_same_training(model, eager, lambda m: m.forward_loss(tokens, labels)))
    assert built == 1 + 1 + 1  # every transformer block shares one graph, every head block another, the head's output layer


def test_compiled_gpt_kv_cache_decoding_matches_eager():
    model = tiny_gpt()
    eager = copy.deepcopy(model)
    compile_blocks(model)
    labels = torch.tensor([3, 0, 9])
    out = generate(model, labels, guidance=2.5, generator=torch.Generator().manual_seed(4))
    ref = generate(eager, labels, guidance=2.5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert model.training and model.layers[0].attention.kv_cache is None


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_tokenizer_training_with_compile_matches_eager(tmp_path):
    steps = 5  # the zero-initialised DiT needs a few updates before every block (and the encoder) gets gradients
    train_tokenizer(micro_tokenizer_run(*TOKENIZER_OVERRIDES), tmp_path / "eager", stop_at_step=steps)
    built = graphs_built(lambda: train_tokenizer(micro_tokenizer_run(*TOKENIZER_OVERRIDES, "runtime.compile=true"),
                                                 tmp_path / "compiled", stop_at_step=steps))
    assert built == 2 + 1 + 1  # as in the block test: the same shapes, so the inductor cache has them
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(1, steps + 1))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
    a = consolidated_slices(list_checkpoints(tmp_path / "eager")[-1])
    b = consolidated_slices(list_checkpoints(tmp_path / "compiled")[-1])
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6, msg=key)


# ---- FLOP model ---------------------------------------------------------------------------------------------------

def _counted(fn) -> float:
    """FLOPs of fn() by torch's counter, taught the CPU attention kernel it does not know."""
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_formulas_match_a_flop_counter():
    """Every matmul and attention of the real models, at odd sizes, is in the formulas (dense attention)."""
    dispatch.set_fast_paths(False)  # the masked encoder attention is the dense count
    B = 3
    cfg = TokenizerConfig(
        image_size=24,
        encoder=EncoderConfig(size="custom", dim=24, depth=2, heads=3, patch_size=8, num_slots=5, slot_dim=6,
                              mlp_ratio=3.0),
        decoder=DecoderConfig(size="custom", depth=2, hidden=20, heads=2, patch_size=2, repa_block=1,
                              repa_proj_dim=12, repa_target_dim=7),
        codec=CodecConfig(kind="kl16", path="unused", latent_channels=4, downsample=4))
    tok = SemanticistTokenizer(cfg)
    images = torch.rand(B, 3, 24, 24)
    assert _counted(lambda: tok.encode(images)) == B * flops.encoder_forward(cfg.encoder, 24)
    x, t, slots = torch.randn(B, 4, 6, 6), torch.randint(0, 1000, (B,)), torch.randn(B, 5, 6)
    for repa in (True, False):
        assert (_counted(lambda: tok.dit(x, t, slots, return_repa=repa))
                == B * flops.decoder_forward(cfg.decoder, 4, 6, 5, 6, repa))

    gpt_cfg = GPTConfig(size="custom", layers=2, heads=2, dim=20, head_width=18, head_depth=2, num_classes=10,
                        num_tokens=7, diffusion_batch_mul=3, token_dim=5)
    gpt = GPT(gpt_cfg)
    tokens, labels = torch.randn(B, 7, 5), torch.randint(0, 10, (B,))
    step = flops.ar_step(gpt_cfg)
    assert _counted(lambda: gpt.forward_loss(tokens, labels)) == B * (step["gpt_fwd"] + step["head_fwd"])

    vae_cfg = VAEConfig(block_out_channels=(8, 8, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4)
    vae = AutoencoderKL(vae_cfg)
    assert _counted(lambda: vae.encode(torch.randn(B, 3, 20, 20))) == B * flops.vae_encoder_forward(vae_cfg, 20)
    dino, _ = small_test_dinov2()
    assert (_counted(lambda: dino.forward_features(torch.randn(B, 3, 56, 56)))
            == B * flops.dinov2_forward(dino.config))


def test_flops_of_the_published_models_match_the_spec():
    """SEMANTICIST.md "Cost (FLOPs)": ViT-B 97, DiT-L-2 209, VAE 138, DINOv2 46 GF; GPT-L 20 + head 46 GF."""
    tok = flops.tokenizer_step(flops.published_tokenizer_config())
    ar = flops.ar_step(GPTConfig(size="L", num_tokens=32))
    spec = {"encoder_fwd": (tok, 97), "decoder_fwd": (tok, 209), "vae_encoder_fwd": (tok, 138),
            "teacher_fwd": (tok, 46), "gpt_fwd": (ar, 20), "head_fwd": (ar, 46)}
    for key, (counts, gflops) in spec.items():
        assert counts[key] / 1e9 == pytest.approx(gflops, rel=0.1), key
    assert tok["total"] / 1e12 == pytest.approx(1.10, rel=0.1)
    assert ar["total"] / 1e12 == pytest.approx(0.2, rel=0.1)


# ---- benchmark smoke ----------------------------------------------------------------------------------------------

def test_bench_train_smoke():
    """The benchmark runs end to end on CPU (eager: compiled steps are covered above) and reports sane numbers."""
    record = bench_train.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--no-compile", "--no-write"])
    assert [r["workload"] for r in record["results"]] == ["tokenizer-tiny", "ar-tiny"]
    for row in record["results"]:
        for name in ("plain", "optimised"):
            v = row[name]
            assert v["step_s"] > 0 and v["images_per_s"] > 0 and v["peak_memory_bytes"] > 0
            assert v["tflops"] == pytest.approx(row["trained_flops_per_image"] * row["batch"] / v["step_s"] / 1e12)
            assert v["mfu"] is None and v["compiled_blocks"] == 0
        # Same weights, batch and draws; the fast paths change only rounding.
        assert row["loss_rel_diff"] < 1e-4
    assert dispatch.fast_paths_enabled()
