"""epsilon-LlamaGen: layout, forward numerics, KV-cached decoding, loss, sampling and checkpoint conversion."""
import math

import pytest
import torch
import torch.nn.functional as F

from semanticist_fast.convert import convert_gpt_state_dict, infer_gpt_config
from semanticist_fast.common.noise import BatchNoise
from semanticist_fast.models.gpt import GPT, GPTConfig, ffn_hidden
from semanticist_fast.inference.generation import generate, guidance_at

from helpers import layout_shapes, randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def read_layout() -> dict:
    return layout_shapes("gpt_GPT-L.tsv")


def tiny_config(**overrides) -> GPTConfig:
    cfg = dict(size="custom", layers=2, heads=4, dim=64, head_width=64, head_depth=2, num_classes=10,
               num_tokens=7, head_sample_steps=8)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def reference_conditions(model: GPT, labels, tokens):
    """Plain causal transformer from the parameters: [class, z_proj(tokens)] -> head conditions."""
    h = torch.cat([model.cls_embedding.embedding_table.weight[labels][:, None],
                   tokens @ model.z_proj.weight.T + model.z_proj.bias], dim=1)
    S = h.shape[1]

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    h = rms(h + model.pos_embed_learned[:, :S], model.z_proj_ln.weight)
    heads, dh = model.heads, model.dim // model.heads
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for layer in model.layers:
        x = rms(h, layer.attention_norm.weight)
        q, k, v = (x @ layer.attention.wqkv.weight.T).split(model.dim, dim=-1)
        q, k, v = (t.view(t.shape[0], S, heads, dh).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + att.transpose(1, 2).reshape(h.shape) @ layer.attention.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(h, model.norm.weight) + model.diffusion_pos_embed_learned[:, :S]


# -- config and layout -----------------------------------------------------------------------------------------------
def test_config_sizes():
    assert GPTConfig(size="L").resolved() == (24, 16, 1024)
    assert GPTConfig(size="B").resolved() == (12, 12, 768)
    assert GPTConfig(size="XXL").resolved() == (48, 24, 1536)
    assert GPTConfig(size="custom", layers=3, heads=2, dim=8).resolved() == (3, 2, 8)
    with pytest.raises(ValueError, match="heads"):
        GPTConfig(size="custom", layers=3, dim=8).resolved()
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(size="custom", layers=1, heads=3, dim=8))
    assert ffn_hidden(1024) == 2816 and ffn_hidden(768) == 2048 and ffn_hidden(64) == 256


def test_gpt_l_layout_matches_official():
    with torch.device("meta"):
        model = GPT(GPTConfig(size="L"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_layout()


# -- forward numerics ------------------------------------------------------------------------------------------------
def test_forward_matches_plain_reference():
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config(heads=2, dim=48))).eval()
    labels, tokens = torch.tensor([3, 10, 0]), torch.randn(3, 5, 16)
    ours = model(labels, tokens)
    assert ours.shape == (3, 6, 48)
    torch.testing.assert_close(ours, reference_conditions(model, labels, tokens), rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = randomized(GPT(tiny_config())).eval()
    labels, tokens = torch.tensor([1, 4, 10]), torch.randn(3, model.num_tokens - 1, 16)
    full = model(labels, tokens)
    with torch.no_grad():
        model.setup_caches(max_batch=5, dtype=torch.float32, device="cpu")  # more rows than used
        steps = [model(labels, None, torch.tensor([0]))]
        for p in range(1, model.num_tokens):
            steps.append(model(None, tokens[:, p - 1:p], torch.tensor([p])))
        # A chunked prefill (class + 2 tokens at once) then single steps must agree too.
        model.setup_caches(max_batch=3, dtype=torch.float32, device="cpu")
        chunk = [model(labels, tokens[:, :2], torch.arange(3))]
        for p in range(3, model.num_tokens):
            chunk.append(model(None, tokens[:, p - 1:p], torch.tensor([p])))
        model.reset_caches()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(chunk, dim=1), full, rtol=1e-5, atol=1e-5)
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_caches_stay_out_of_state_dict():
    model = GPT(tiny_config())
    keys = set(model.state_dict())
    model.setup_caches(2, torch.float32, "cpu")
    assert set(model.state_dict()) == keys


# -- training loss ---------------------------------------------------------------------------------------------------
def test_forward_loss_draws_per_sample_and_ignores_extra_tokens():
    # Training mode with class dropout; element-wise dropout stays on the process's own stream, so it is off here.
    model = randomized(GPT(tiny_config(diffusion_batch_mul=3, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.5)))
    tokens, labels = torch.randn(4, 11, 16), torch.tensor([2, 5, 1, 0])
    loss = model.forward_loss(tokens, labels, BatchNoise(1, 4, slice(0, 4), "cpu"))
    # Ranks take rows of the global batch: the halves' losses average to the whole's (class dropout included).
    halves = [model.forward_loss(tokens[r], labels[r], BatchNoise(1, 4, r, "cpu")) for r in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss)
    # Tokens past num_tokens are ignored.
    tokens2 = tokens.clone()
    tokens2[:, model.num_tokens:] = 100.0
    torch.testing.assert_close(model.forward_loss(tokens2, labels, BatchNoise(1, 4, slice(0, 4), "cpu")), loss)
    # A row's loss is the head's loss of that row: with one copy per token, the rows are the tokens in order.
    single = randomized(GPT(tiny_config(diffusion_batch_mul=1))).eval()
    rng_a, rng_b = BatchNoise(2, 4, slice(0, 4), "cpu"), BatchNoise(2, 4, slice(0, 4), "cpu")
    t, noise = single.diffloss.training_draws(rng_b, 4, single.num_tokens)
    cond = single(labels, tokens[:, :single.num_tokens - 1]).reshape(-1, 64)
    expected = single.diffloss.loss(tokens[:, :single.num_tokens].reshape(-1, 16), cond, t.reshape(-1),
                                    noise.reshape(-1, 16)).mean()
    torch.testing.assert_close(single.forward_loss(tokens, labels, rng_a), expected)


def test_class_dropout():
    model = GPT(tiny_config(class_dropout=0.25))
    torch.manual_seed(0)
    dropped = model.drop_labels(torch.zeros(20000, dtype=torch.long))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.25) < 0.02


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_training_step_reduces_loss(objective):
    torch.manual_seed(0)
    model = GPT(tiny_config(head_objective=objective, class_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0))
    tokens, labels = torch.randn(4, 7, 16), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        loss = model.forward_loss(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


# -- sampling --------------------------------------------------------------------------------------------------------
def test_guidance_schedule():
    assert guidance_at(6.0, 0, 32, "linear") == pytest.approx(1 + 5 / 32)
    assert guidance_at(6.0, 31, 32, "linear") == pytest.approx(6.0)
    assert guidance_at(6.0, 15, 32, "linear") == pytest.approx(1 + 5 * 16 / 32)
    assert guidance_at(6.0, 3, 32, "constant") == 6.0
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_at(6.0, 0, 32, "cosine")


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_generate_cached_equals_naive(objective):
    model = randomized(GPT(tiny_config(head_objective=objective))).train()
    labels = torch.tensor([0, 7, 3])

    def run(**kwargs):
        gen = torch.Generator().manual_seed(0)
        return generate(model, labels, guidance=2.0, generator=gen, head_steps=6, **kwargs)

    fast = run()
    assert fast.shape == (3, model.num_tokens, 16) and torch.isfinite(fast).all()
    assert model.training  # mode restored
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    # An untrained DDPM head predicts x0 = x_t / sqrt(alpha_bar): huge values, so compare relative to the scale.
    scale = fast.abs().max().clamp(min=1.0)
    for other in (run(use_kv_cache=False), run(use_kv_cache=False, sampler="sde_naive")):
        torch.testing.assert_close(other / scale, fast / scale, rtol=0, atol=1e-5)


def test_generate_guidance_uses_null_class_and_shared_noise():
    model = randomized(GPT(tiny_config())).eval()
    labels = torch.tensor([4, 4])
    kwargs = dict(guidance_schedule="constant", head_steps=5)
    plain = generate(model, labels, guidance=1.0, generator=torch.Generator().manual_seed(2), **kwargs)
    guided = generate(model, labels, guidance=3.0, generator=torch.Generator().manual_seed(2), **kwargs)
    assert not torch.allclose(plain, guided, atol=1e-3)
    # With the null class embedding equal to class 4, cond == uncond: guidance must be a no-op,
    # which also shows both halves are driven by the same noise.
    with torch.no_grad():
        model.cls_embedding.embedding_table.weight[model.num_classes] = model.cls_embedding.embedding_table.weight[4]
    plain = generate(model, labels, guidance=1.0, generator=torch.Generator().manual_seed(2), **kwargs)
    guided = generate(model, labels, guidance=3.0, generator=torch.Generator().manual_seed(2), **kwargs)
    torch.testing.assert_close(guided, plain, rtol=1e-4, atol=1e-4)


def test_generate_ode_is_deterministic():
    model = randomized(GPT(tiny_config())).eval()
    labels = torch.tensor([1, 2, 9])
    a = generate(model, labels, guidance=2.0, sampler="ode", generator=torch.Generator().manual_seed(0), head_steps=4)
    b = generate(model, labels, guidance=2.0, sampler="ode", generator=torch.Generator().manual_seed(0), head_steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- checkpoint conversion -------------------------------------------------------------------------------------------
def official_gpt_l_state_dict(prefix: str = "") -> dict:
    """Every tensor of the official GPT-L layout, on the meta device (shapes only, no memory)."""
    return {prefix + k: torch.empty(shape, device="meta") for k, shape in read_layout().items()}


def test_convert_official_layout_strictly():
    sd = official_gpt_l_state_dict(prefix="_orig_mod.")
    ours, config = convert_gpt_state_dict(sd)
    assert config.resolved() == (24, 16, 1024) and config.size == "L"
    head = (config.head_width, config.head_depth, config.head_cond, config.head_objective)
    assert head == (1536, 12, "concat", "flow")
    assert (config.token_dim, config.num_tokens, config.num_classes) == (16, 32, 1000)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(ours, strict=True, assign=True)
    assert set(ours) == set(read_layout())


def test_convert_names_every_bad_key():
    sd = official_gpt_l_state_dict(prefix="module.")
    del sd["module.layers.3.ffn_norm.weight"]
    sd["module.layers.0.attention.bogus"] = torch.empty(3, device="meta")
    sd["module.z_proj.bias"] = torch.empty(7, device="meta")
    with pytest.raises(ValueError) as err:
        convert_gpt_state_dict(sd)
    message = str(err.value)
    assert "layers.3.ffn_norm.weight" in message
    assert "layers.0.attention.bogus" in message
    assert "z_proj.bias" in message
    with pytest.raises(ValueError, match="diffusion_pos_embed_learned"):
        convert_gpt_state_dict({k: v for k, v in official_gpt_l_state_dict().items() if "diffusion_pos" not in k})


@pytest.mark.parametrize("objective,cond", [("flow", "adaln"), ("ddpm", "concat")])
def test_convert_round_trip_small_model(objective, cond):
    config = tiny_config(head_objective=objective, head_cond=cond, head_depth=3)
    model = randomized(GPT(config)).eval()
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="head count"):
        infer_gpt_config(model.state_dict())
    ours, inferred = convert_gpt_state_dict({"state_dict": sd}, heads=4)
    assert (inferred.head_objective, inferred.head_cond, inferred.head_depth) == (objective, cond, 3)
    assert inferred.resolved() == config.resolved() and inferred.num_tokens == 7 and inferred.num_classes == 10
    rebuilt = GPT(inferred).eval()
    rebuilt.load_state_dict(ours, strict=True)
    labels, tokens = torch.tensor([1, 2]), torch.randn(2, 4, 16)
    torch.testing.assert_close(rebuilt(labels, tokens), model(labels, tokens), rtol=0, atol=0)
