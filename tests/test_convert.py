"""Official tokenizer checkpoints -> ours: config inference from the published layouts, strict loading, the CLI.

The full-size layouts (DiT-L-2: 551M, DiT-XL-2: 768M parameters) are built from the layout files with
uninitialised storage (never touched, so it costs no memory) plus random values in a few keys that are then
checked to survive conversion; the model is built on the meta device.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semanticist_fast.config import from_dict
from semanticist_fast.convert import convert_tokenizer, detect_kind
from semanticist_fast.models.weights import read_weights, strip_prefixes
from semanticist_fast.models.dit import DecoderConfig
from semanticist_fast.models.latent_codec import CodecConfig, PixelCodec
from semanticist_fast.models.tokenizer import SemanticistTokenizer, TokenizerConfig
from semanticist_fast.models.vit import EncoderConfig
from semanticist_fast.inference import Tokenizer
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun

from helpers import LAYOUTS, parse_layout, randomized

ROOT = Path(__file__).resolve().parents[1]
CHECKED_KEYS = ["encoder.cls_token", "encoder.slot_embed", "encoder2slot.weight", "dit.null_cond",
                "dit.blocks.0.attn.qkv.bias", "dit.final_layer.linear.weight", "encoder.blocks.11.mlp.fc2.weight"]


def _layout_state(size: str, prefix: str = "") -> dict:
    path = LAYOUTS / f"tokenizer_DiT-{size}-2.tsv"
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape, dtype in parse_layout(path):
        if dtype == torch.int64:
            state[prefix + name] = torch.arange(shape[0]) if len(shape) == 1 else torch.zeros(shape, dtype=dtype)
        elif name in CHECKED_KEYS:
            state[prefix + name] = torch.randn(shape, generator=g, dtype=dtype)
        else:
            state[prefix + name] = torch.empty(shape, dtype=dtype)
    return state


DIT_EXPECTED = {"L": (24, 1024, 16), "XL": (28, 1152, 16)}


@pytest.fixture(scope="module", params=["L", "XL"])
def official(request):
    size = request.param
    # Both wrapper prefixes, as DDP (`module.`) around torch.compile (`_orig_mod.`) writes them.
    return size, _layout_state(size, prefix="module._orig_mod.")


def test_layout_parsing_counts_match_the_totals():
    for size in ("L", "XL"):
        path = LAYOUTS / f"tokenizer_DiT-{size}-2.tsv"
        total = int(re.search(r"# total elements: (\d+)", path.read_text()).group(1))
        rows = parse_layout(path)
        assert sum(torch.Size(s).numel() for _, s, _ in rows) == total


def test_convert_infers_config_and_loads_strictly(official):
    size, state = official
    converted = convert_tokenizer(strip_prefixes(state))
    assert converted["kind"] == "tokenizer"

    model_cfg = converted["config"]["model"]
    assert model_cfg["image_size"] == 256
    enc = model_cfg["encoder"]
    assert (enc["dim"], enc["depth"], enc["heads"], enc["patch_size"]) == (768, 12, 12, 16)  # ViT-B/16
    assert (enc["num_slots"], enc["slot_dim"]) == (256, 16)
    dec = model_cfg["decoder"]
    assert dec["size"] == size and dec["patch_size"] == 2 and dec["learn_sigma"] is True
    assert (dec["repa_block"], dec["repa_proj_dim"], dec["repa_target_dim"]) == (8, 2048, 768)
    codec = model_cfg["codec"]
    assert (codec["kind"], codec["latent_channels"], codec["downsample"]) == ("kl16", 16, 16)

    run = from_dict(TokenizerRun, converted["config"])  # the saved config is a valid run config
    assert run.model.decoder.resolved() == DIT_EXPECTED[size]
    with torch.device("meta"):
        model = SemanticistTokenizer(run.model)
    assert model.dit.blocks[0].attn.num_heads == DIT_EXPECTED[size][2]
    assert model.encoder.blocks[0].attn.num_heads == 12

    ours = converted["weights"]  # the official weights are what inference loads (our EMA slot)
    assert "nested_sampler.arange" not in ours
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours, strict=True, assign=True)
    for name in CHECKED_KEYS:
        original = state["module._orig_mod." + name]
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], original)
    assert torch.equal(model.encoder.cls_token, state["module._orig_mod.encoder.cls_token"])
    assert torch.equal(model.dit.null_cond, state["module._orig_mod.dit.null_cond"])


def _base_state():
    return strip_prefixes(_layout_state("L"))


def test_extra_key_is_rejected_by_name():
    state = _base_state()
    state["dit.blocks.0.attn.extra_scale"] = torch.ones(3)
    with pytest.raises(ValueError, match=re.escape("dit.blocks.0.attn.extra_scale")):
        convert_tokenizer(state)


def test_missing_key_is_rejected_by_name():
    state = _base_state()
    del state["dit.blocks.5.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=re.escape("dit.blocks.5.mlp.fc1.bias")):
        convert_tokenizer(state)
    state = _base_state()
    del state["encoder.slot_embed"]  # a key the inference itself reads
    with pytest.raises(ValueError, match=re.escape("encoder.slot_embed")):
        convert_tokenizer(state)


def test_wrong_shape_is_rejected_by_name():
    state = _base_state()
    state["encoder.blocks.3.attn.proj.weight"] = torch.empty(768, 767)
    with pytest.raises(ValueError, match=re.escape("encoder.blocks.3.attn.proj.weight")):
        convert_tokenizer(state)


def test_unknown_sizes_are_rejected():
    state = _base_state()
    for key in [k for k in state if k.startswith("dit.blocks.23.")]:
        del state[key]
    with pytest.raises(ValueError, match="named size"):
        convert_tokenizer(state)  # a 23-block DiT of width 1024 is none of S/B/L/XL: its heads are unknown


def test_strip_prefixes():
    t = torch.zeros(1)
    state = {"module._orig_mod.encoder.cls_token": t, "_orig_mod.module.dit.null_cond": t,
             "dit.blocks.0._orig_mod.attn.qkv.weight": t, "encoder2slot.bias": t}
    assert set(strip_prefixes(state)) == {"encoder.cls_token", "dit.null_cond", "dit.blocks.0.attn.qkv.weight",
                                          "encoder2slot.bias"}


def test_detect_kind():
    assert detect_kind({"encoder.cls_token": 0, "dit.null_cond": 0}) == "tokenizer"
    assert detect_kind({"layers.0.w": 0, "diffloss.net.w": 0}) == "gpt"
    with pytest.raises(ValueError, match="--kind"):
        detect_kind({"foo.bar": 0})


# ---- a small official-layout checkpoint, end to end through the CLI ----

def _small_official_model() -> SemanticistTokenizer:
    """Named sizes (heads are inferred from them): a 2-block ViT-tiny/16 encoder and a DiT-S/4 on 32 px pixels."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(size="tiny", depth=2, num_slots=8),
        decoder=DecoderConfig(size="S", patch_size=4, repa_proj_dim=64, repa_target_dim=32),
        codec=CodecConfig(kind="pixel"),
    )
    model = SemanticistTokenizer(cfg)
    with torch.no_grad():  # the zero-initialised adaLN / final layers would hide any mix-up of weights
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "semanticist_fast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    model = _small_official_model()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["module._orig_mod.nested_sampler.arange"] = torch.arange(8)
    src = tmp_path_factory.mktemp("official") / "tokenizer.pth"
    torch.save({"model": state, "epoch": 400}, src)  # the weights under an entry, as training scripts save
    return model, src


def test_cli_convert_end_to_end(small_official, tmp_path):
    model, src = small_official
    dst = tmp_path / "converted.safetensors"
    result = _cli("convert", str(src), str(dst))
    assert result.returncode == 0, result.stderr
    assert dst.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    tok = Tokenizer.from_checkpoint(dst, device="cpu")
    cfg = tok.config
    assert cfg.image_size == 32 and cfg.codec.kind == "pixel"
    assert cfg.encoder.resolved() == (192, 2, 3, 16) and cfg.encoder.num_slots == 8
    assert cfg.decoder.resolved() == (12, 384, 6) and cfg.decoder.patch_size == 4
    assert (cfg.decoder.repa_proj_dim, cfg.decoder.repa_target_dim) == (64, 32)
    for name, value in model.state_dict().items():
        assert torch.equal(tok.model.state_dict()[name], value), name

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tok.encode(images)
    assert tokens.shape == (2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(tokens, model.encode(images), rtol=0, atol=0)
    recon = tok.decode(tokens, num_tokens=4, steps="ddim2", generator=torch.Generator().manual_seed(2))
    assert recon.shape == (2, 3, 32, 32) and recon.min() >= 0 and recon.max() <= 1
    # The converted tokenizer decodes exactly as the original weights do.
    reference = Tokenizer(model, PixelCodec(), "cpu").decode(tokens, num_tokens=4, steps="ddim2",
                                                             generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(recon, reference, rtol=0, atol=0)


def test_decoding_a_token_prefix_equals_decoding_the_first_k(small_official):
    model, _ = small_official
    tok = Tokenizer(model, PixelCodec(), "cpu")
    tokens = tok.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))

    def decode(t, **kw):
        return tok.decode(t, steps="ddim2", generator=torch.Generator().manual_seed(4), **kw)

    # An AR model hands over only its first k tokens: the missing slots are null, never the zero padding.
    torch.testing.assert_close(decode(tokens[:, :3]), decode(tokens, num_tokens=3), rtol=0, atol=0)
    assert not torch.equal(decode(tokens[:, :3]), decode(tokens))
    with pytest.raises(ValueError, match="num_tokens"):
        decode(tokens[:, :3], num_tokens=5)
    with pytest.raises(ValueError, match="8 slots"):
        decode(torch.cat([tokens, tokens], dim=1))


def test_cli_convert_rejects_unknown_key(small_official, tmp_path):
    model, _ = small_official
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.dit.unexpected_gain"] = torch.ones(4)
    src = tmp_path / "bad.pth"
    torch.save(state, src)
    result = _cli("convert", str(src), str(tmp_path / "out.safetensors"))
    assert result.returncode == 1  # a file that does not fit: a runtime error, named in one line
    assert "dit.unexpected_gain" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_read_state_dict_safetensors_and_half_precision(tmp_path):
    from safetensors.torch import save_file

    model = _small_official_model()
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "official.safetensors"
    save_file({f"_orig_mod.{k}": v for k, v in state.items()}, str(path))
    loaded = read_weights(path)
    assert set(loaded) == set(state)
    converted = convert_tokenizer(loaded)
    for name in ("encoder.cls_token", "dit.blocks.11.adaLN_modulation.1.weight"):
        assert converted["weights"][name].dtype == torch.float32
        assert torch.equal(converted["weights"][name], state[name].float())
    with pytest.raises(FileNotFoundError):
        read_weights(tmp_path / "missing.pth")


def test_cli_converts_a_gpt_checkpoint_of_custom_size(tmp_path):
    """An official-layout GPT state dict (wrapped, prefixed) -> `semanticist-fast convert` -> the AR loader."""
    from semanticist_fast.models.gpt import GPT, GPTConfig
    from semanticist_fast.inference import load_generator

    torch.manual_seed(0)
    cfg = GPTConfig(size="custom", layers=2, heads=4, dim=64, num_tokens=6, num_classes=10, head_width=32,
                    head_depth=2)
    gpt = GPT(cfg).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in gpt.state_dict().items()}}, tmp_path / "official.pth")
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", "convert", str(tmp_path / "official.pth"),
                        str(tmp_path / "ours.safetensors"), "--kind", "gpt", "model.heads=4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = load_generator(tmp_path / "ours.safetensors", "cpu").gpt
    assert loaded.config.resolved() == (2, 4, 64) and loaded.config.num_tokens == 6
    labels, tokens = torch.tensor([1, 7]), torch.randn(2, 5, 16)
    torch.testing.assert_close(loaded(labels, tokens), gpt(labels, tokens), rtol=0, atol=0)
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", "convert", str(tmp_path / "official.pth"),
                        str(tmp_path / "x.safetensors"), "--kind", "gpt"], capture_output=True, text=True)
    assert r.returncode == 2 and "head" in r.stderr  # a custom size needs its head count


# ---- a custom-width official-layout checkpoint: what shapes cannot show comes from overrides ----

CUSTOM_WIDTH = ["model.encoder.heads=3", "model.decoder.heads=4", "model.decoder.repa_block=1"]


@pytest.fixture(scope="module")
def custom_width(tmp_path_factory):
    """Widths no named size has: a 2-block encoder of width 48 (3 heads) and a 2-block DiT of width 64 (4 heads)
    whose REPA projector reads block 1 (the published block 8 does not exist here)."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        image_size=32,
        encoder=EncoderConfig(size="custom", dim=48, depth=2, heads=3, patch_size=8, num_slots=4),
        decoder=DecoderConfig(size="custom", depth=2, hidden=64, heads=4, patch_size=4, repa_block=1,
                              repa_proj_dim=32, repa_target_dim=16),
        codec=CodecConfig(kind="pixel"),
    )
    model = randomized(SemanticistTokenizer(cfg))  # attention far from uniform: a wrong head count would show
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.nested_sampler.arange"] = torch.arange(4)
    src = tmp_path_factory.mktemp("official") / "custom.pth"
    torch.save({"model": state}, src)
    return model.eval(), src


def test_custom_width_tokenizer_converts_with_overrides_and_decodes_as_the_original(custom_width, tmp_path):
    model, src = custom_width
    dst = tmp_path / "custom.safetensors"
    result = _cli("convert", str(src), str(dst), *CUSTOM_WIDTH)
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.from_checkpoint(dst, device="cpu")
    assert tok.config.encoder.resolved() == (48, 2, 3, 8) and tok.config.decoder.resolved() == (2, 64, 4)
    assert tok.config.decoder.repa_block == 1
    assert tok.model.encoder.blocks[0].attn.num_heads == 3 and tok.model.dit.blocks[0].attn.num_heads == 4
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tok.encode(images)
    with torch.no_grad():
        torch.testing.assert_close(tokens, model.encode(images), rtol=0, atol=0)
    reference = Tokenizer(model, PixelCodec(), "cpu")
    for k in (1, 4):
        decoded = [t.decode(tokens, num_tokens=k, steps="ddim2", generator=torch.Generator().manual_seed(2))
                   for t in (tok, reference)]
        torch.testing.assert_close(decoded[0], decoded[1], rtol=0, atol=0)


def test_custom_width_tokenizer_needs_its_overrides_and_refuses_wrong_ones(custom_width):
    model, src = custom_width
    state = strip_prefixes(read_weights(src))
    with pytest.raises(ValueError, match="named size") as refused:
        convert_tokenizer(state)  # heads cannot be inferred: every missing key is named, with its fix
    for key in ("model.encoder.heads=N", "model.decoder.heads=N", "model.decoder.repa_block=N"):
        assert key in str(refused.value)
    with pytest.raises(ValueError, match="model.decoder.heads=N") as refused:
        convert_tokenizer(state, ["model.encoder.heads=3", "model.decoder.repa_block=1"])
    assert "encoder.heads" not in str(refused.value)
    with pytest.raises(ValueError, match="encoder heads 5"):
        convert_tokenizer(state, ["model.encoder.heads=5", *CUSTOM_WIDTH[1:]])  # 48 is not divisible by 5
    with pytest.raises(ValueError, match="decoder heads 3"):
        convert_tokenizer(state, [CUSTOM_WIDTH[0], "model.decoder.heads=3", CUSTOM_WIDTH[2]])
    with pytest.raises(ValueError, match=r"model\.decoder\.repa_block=3"):
        convert_tokenizer(state, [*CUSTOM_WIDTH[:2], "model.decoder.repa_block=3"])  # the DiT has 2 blocks
    with pytest.raises(ValueError, match=r"model\.decoder\.headz"):
        convert_tokenizer(state, [*CUSTOM_WIDTH, "model.decoder.headz=4"])
    with pytest.raises(ValueError, match=re.escape("encoder.blocks.2.attn.qkv.weight")):
        convert_tokenizer(state, [*CUSTOM_WIDTH, "model.encoder.depth=3"])  # still strict about every key
    with pytest.raises(ValueError, match=re.escape("encoder.patch_embed.proj.weight")):
        convert_tokenizer(state, [*CUSTOM_WIDTH, "model.encoder.dim=96", "model.encoder.heads=4"])  # and shape
    # A head count that divides the width gives the same shapes: only the outputs can tell it is wrong.
    wrong = convert_tokenizer(state, ["model.encoder.heads=6", *CUSTOM_WIDTH[1:]])
    other = SemanticistTokenizer(from_dict(TokenizerRun, wrong["config"]).model)
    other.load_state_dict(wrong["weights"], strict=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (other.eval().encode(images) - model.encode(images)).abs().max() > 1e-3  # the right count: 0
